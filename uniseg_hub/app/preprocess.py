"""The preprocessing and its inverse on their own, for users who fine-tune or evaluate elsewhere and must feed
exactly what the weights expect: the transforms are those of the bundle's ``configs/inference.json`` (its
``loading`` and ``preparing`` lists), parsed from it, so there is still one pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from ..config import NAN_POLICIES, NORMALIZATION_MASKS, RESAMPLING, choice
from ..errors import InputError
from ..pipeline import InvertToInputd, resolve_tasks
from ..pretrained import model_tasks
from ..tasks import OFFICIAL_TASKS, TaskTable
from .bundle import config_file
from .predict import unwrap_error


def _parser(task, modality: str, table: TaskTable, overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file("inference.json")))
    parser.update({"task": task, "modality": modality, "keep_source": False, "overwrite": True,
                   "task_table": table, **overrides})
    return parser


def preprocess(image: str | os.PathLike | Sequence[str | os.PathLike] | MetaTensor, task: str | int = "liver", *,
               modality: str = "CT", resampling: str = "nnunet", nan: str = "zero",
               normalization_mask: str = "training", model: str | os.PathLike | None = None) -> MetaTensor:
    """The network-ready image (C, x, y, z) in MONAI axis order, as the bundle's inference feeds the network.

    Args:
        image: a NIfTI file, a DICOM series folder, one file per channel (multi-channel tasks), or a channel-first
            ``MetaTensor`` with its affine (as ``LoadImaged`` + ``EnsureChannelFirstd`` give it).
        task: the task (name or id) whose spacing and normalisation apply; ``"all"`` takes the first task of the
            group, as the all-tasks inference does.
        modality, resampling, nan, normalization_mask: as for ``predict`` (the official behaviour by default).
        model: the model whose task table names ``task`` (a task added with ``add-task``); default the official
            eleven tasks. Only its ``config.json`` is read.

    The result keeps its metadata and the trace of what was done (crop, resampling), which ``postprocess`` uses
    to bring predictions back to the input grid.
    """
    table = OFFICIAL_TASKS if model is None else model_tasks(model)
    options = {"resampling": choice(resampling, "resampling", RESAMPLING), "nan": choice(nan, "nan", NAN_POLICIES),
               "normalization_mask": choice(normalization_mask, "normalization_mask", NORMALIZATION_MASKS)}
    if isinstance(image, MetaTensor):
        if image.ndim != 4:
            raise InputError(f"expected a channel-first (C, x, y, z) MetaTensor, got shape {tuple(image.shape)}")
        parser = _parser(task, modality, table, {**options, "tasks": resolve_tasks(task, modality, image.shape[0],
                                                                                     table)})
        section, data = "preparing", {"image": image}
    elif isinstance(image, torch.Tensor):
        raise InputError("a plain tensor has no affine, so its spacing is unknown; pass a MetaTensor (with its "
                         "affine) or the file")
    else:
        files = [os.fspath(image)] if isinstance(image, (str, os.PathLike)) else [os.fspath(f) for f in image]
        if not files:
            raise InputError("no input given; pass a NIfTI file, one file per channel, or a DICOM series folder")
        parser = _parser(task, modality, table, {**options, "input": files[0] if len(files) == 1 else files})
        section, data = "preprocessing", {"image": files[0] if len(files) == 1 else files}
    try:
        transforms = parser.get_parsed_content(section)
        pipeline = transforms if isinstance(transforms, Compose) else Compose([t for t in transforms if t is not None])
        return pipeline(data)["image"]
    except RuntimeError as e:  # MONAI wraps what the config or a transform raises; ours are re-raised as themselves
        if (cause := unwrap_error(e)) is None:
            raise
        raise cause from None


def postprocess(prediction: torch.Tensor, image: MetaTensor) -> MetaTensor:
    """``prediction`` (C, *image's grid), e.g. probabilities for ``image = preprocess(...)``, brought back to the
    input grid as the official export does (order 1, nearest along the low-resolution axis of anisotropic scans,
    zero outside the crop), with the input's affine. Take the argmax afterwards for labels."""
    if not isinstance(image, MetaTensor) or not image.applied_operations:
        raise InputError("postprocess needs the MetaTensor that preprocess returned (its trace says how to go back)")
    if tuple(prediction.shape[1:]) != tuple(image.shape[1:]):
        raise InputError(f"the prediction's grid {tuple(prediction.shape[1:])} is not the preprocessed image's "
                         f"{tuple(image.shape[1:])}")
    invert = InvertToInputd("pred", Compose([]), "image")
    pred = MetaTensor(torch.as_tensor(prediction), affine=image.affine, applied_operations=image.applied_operations)
    return invert({"pred": pred, "image": image})["pred"]
