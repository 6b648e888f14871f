"""Fine-tuning UniSeg with MONAI's workflows: the pieces MONAI and ignite lack, wired by ``bundle/configs/train.json``.

The paper's downstream protocol (``shared/reference/uniseg-official.md`` §3, §5) maps onto MONAI as follows:

* network and transfer (``model``): ``build_network``: ``backbone`` (the paper: encoder and decoder, 97 of the 115
  official tensors), ``encoder`` only, or ``none``; which tensors move is decided by ``uniseg_hub.transfer``;
* loss: MONAI's ``DeepSupervisionLoss`` around ``DiceCELoss`` with nnU-Net's level weights (``ds_weights``); MONAI
  resizes the target to each level with nearest-neighbour interpolation, which is nnU-Net's target downsampling;
* data (``data``) and augmentation (``augmentation``): checked datalists, intensity normalisation, ``RandPatchd``
  (nnU-Net's foreground oversampling, rotation and isotropic scaling in a single resampling); the intensity
  augmentations and mirroring are MONAI transforms in train.json;
* optimisation and bookkeeping (``handlers``): ``GradientClipping``, ``FreezeEncoder``, ``TrainingLog`` (loss,
  learning rate, validation metric per epoch, a PNG of the curves) and ``TrainingCheckpoint`` (``best/`` and
  ``last/`` safetensors folders written atomically, resume);
* ``distributed``: ranks, shards and each rank's share of an epoch's iterations under ``torchrun``;
* ``add_task``: adding a task to the universal model (``configs/add_task.json`` over train.json): the grown
  network, the parameters each mode trains, the before/after Dice of every task on supplied cases;
* ``evaluation``: the per-case report of ``evaluate.json`` and the downstream Dice (nnU-Net's evaluator leaves a
  class absent from prediction and reference out of the mean).

The reported model is the final checkpoint, evaluated with 8-flip mirroring (``uniseg_hub.pipeline
.BackbonePredictor``), as the official protocol does; ``best/`` is selected only on a validation split carved from
the training cases (``carve_validation``), never on the test list.
"""

from .add_task import check_cases, check_model_dir, grow_network, save_added_task, task_dice, trainable
from .augmentation import RandPatchd
from .data import (
    CheckLabeld,
    carve_validation,
    datalist_property,
    intensity_transform,
    label_names,
    load_datalist,
    modalities,
)
from .distributed import is_main_process, iterations_per_rank, rank, shard, unwrap, world_size
from .evaluation import AbsentClassDiceMetric, SegmentationReport, dice_metric
from .handlers import (
    FreezeEncoder,
    GradientClipping,
    ProgressBar,
    TrainingCheckpoint,
    TrainingLog,
    log_metrics,
    loss_of,
)
from .model import build_network, checkpoint_provenance, ds_weights, load_trained

__all__ = ["check_cases", "check_model_dir", "grow_network", "save_added_task", "task_dice", "trainable",
           "RandPatchd", "CheckLabeld", "carve_validation", "datalist_property", "intensity_transform", "label_names",
           "load_datalist", "modalities", "is_main_process", "iterations_per_rank", "rank", "shard", "unwrap",
           "world_size", "AbsentClassDiceMetric", "SegmentationReport", "dice_metric", "FreezeEncoder",
           "GradientClipping", "ProgressBar", "TrainingCheckpoint", "TrainingLog", "loss_of", "log_metrics",
           "build_network", "checkpoint_provenance", "ds_weights", "load_trained"]
