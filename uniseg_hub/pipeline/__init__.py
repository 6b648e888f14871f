"""The inference pipeline's own pieces; ``bundle/configs/inference.json`` wires them with MONAI's transforms,
inferer and evaluator (the one inference pipeline: ``uniseg_hub.app.predict`` drives that config).

* ``cases``: what to segment (datalists, nnU-Net channel naming), with which tasks, case and output names;
* ``transforms``: input checks, the official normalisation, the all-tasks merge, a fast argmax;
* ``predictor``: the network as the sliding-window inferer sees it (softmax, mirroring, all-tasks mode), for the
  universal model (``TaskPredictor``) and a fine-tuned backbone (``BackbonePredictor``), one mirroring code;
* ``sliding_window``: nnU-Net v1's sliding window (window positions, Gaussian map) on MONAI's ``PatchInferer``;
* ``resampling``: to the task's spacing and back to the input grid, as nnU-Net v1 does;
* ``nifti_io``: fast NIfTI reading and atomic writing.
* ``label_files``: beside each label map its colour tables and the ``format`` file (``.seg.nrrd``, DICOM SEG).
"""

from .cases import (
    IMAGE_SUFFIXES,
    MERGED_CLASSES,
    case_name,
    count_channels,
    datalist,
    image_reader,
    resolve_tasks,
    task_spacing,
)
from .nifti_io import AtomicNibabelWriter, NiftiReader
from .predictor import BackbonePredictor, MirroredPredictor, TaskPredictor
from .resampling import InvertToInputd, ResampleToSpacingd
from .sliding_window import NnUNetSlidingWindowInferer
from .transforms import (
    ArgMaxd,
    CheckImaged,
    CheckInputFilesd,
    MergeTasksd,
    NormalizeTaskd,
    ZeroNaNd,
)

__all__ = ["IMAGE_SUFFIXES", "MERGED_CLASSES", "case_name", "count_channels", "datalist", "image_reader",
           "resolve_tasks", "task_spacing", "AtomicNibabelWriter", "NiftiReader", "TaskPredictor",
           "MirroredPredictor", "BackbonePredictor", "NnUNetSlidingWindowInferer", "InvertToInputd",
           "ResampleToSpacingd", "ArgMaxd", "CheckImaged", "CheckInputFilesd", "MergeTasksd", "NormalizeTaskd",
           "ZeroNaNd"]
