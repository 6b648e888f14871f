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
* ``distributed``: ranks and shards under ``torchrun``; ``evaluation``: the per-case report of ``evaluate.json``.
"""

from .augmentation import RandPatchd
from .data import (
    CheckLabeld,
    datalist_property,
    intensity_transform,
    label_names,
    load_datalist,
    modalities,
)
from .distributed import is_main_process, rank, shard, unwrap
from .evaluation import SegmentationReport
from .handlers import (
    FreezeEncoder,
    GradientClipping,
    ProgressBar,
    TrainingCheckpoint,
    TrainingLog,
    log_metrics,
    loss_of,
)
from .model import build_network, ds_weights, load_trained

__all__ = ["RandPatchd", "CheckLabeld", "datalist_property", "intensity_transform", "label_names", "load_datalist",
           "modalities", "is_main_process", "rank", "shard", "unwrap", "SegmentationReport", "FreezeEncoder",
           "GradientClipping", "ProgressBar", "TrainingCheckpoint", "TrainingLog", "loss_of", "log_metrics",
           "build_network", "ds_weights", "load_trained"]
