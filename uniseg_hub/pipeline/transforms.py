"""The transforms of UniSeg inference that MONAI does not have; ``inference.json`` wires them with MONAI's.

* ``CheckInputFilesd`` / ``CheckImaged``: one clear error for each kind of bad input, before any output exists;
* ``ZeroNaNd``: NaN voxels to 0, counted, as the official preprocessing does;
* ``NormalizeTaskd``: per-channel normalisation from the task table (AutoPET mixes a CT window and a PET z-score);
* ``MergeTasksd``: the official all-tasks label map (per task argmax, later tasks overwrite earlier ones);
* ``ArgMaxd``: ``AsDiscreted(argmax=True)`` without PyTorch's slow outer-dimension CPU argmax.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayoutBase, MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRange

from ..config import ALL_TASKS_PROBABILITIES, NAN_POLICIES, NORMALIZATION_MASKS, choice, parse_bool
from ..errors import ConfigError, InputError
from ..tasks import CT_WINDOW, HEAD_CHANNELS, Task, get_task
from .cases import check_dicom_folder, describe_file
from .nifti_io import check_affine, check_resampled_size


class CheckInputFilesd(MapTransform):
    """Check an input before loading it: files exist and read as NIfTI, multi-file inputs share one grid, and the
    outputs it will produce do not exist yet (unless ``overwrite``), so no work is done that cannot be saved.

    Multi-channel tasks (BraTS: four MR sequences, AutoPET: CT and PET) take one file per channel; their shapes must
    be equal and their affines equal within ``atol`` millimetres. ``folder_layout``: the layout (or layouts) the
    ``SaveImaged`` transforms name their outputs with (``cases.CaseLayout``), asked here for the same names, with
    the first file (or the DICOM folder) as subject, as ``SaveImaged`` does. The headers read here are the ones
    the loader then uses (``cases.open_image``): each file is opened once.
    """

    def __init__(self, keys: KeysCollection, folder_layout: FolderLayoutBase | Sequence[FolderLayoutBase] | None = None,
                 overwrite: bool = True, atol: float = 1e-3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        layouts = folder_layout if isinstance(folder_layout, (list, tuple)) else [folder_layout]
        self.layouts = [layout for layout in layouts if layout is not None]
        self.overwrite = parse_bool(overwrite, "overwrite")
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            files = [str(f) for f in (d[key] if isinstance(d[key], (list, tuple)) else [d[key]])]
            if not files:
                raise InputError("an input with no files; give one file per channel")
            if len(files) == 1 and os.path.isdir(files[0]):
                check_dicom_folder(files[0])
                files = []
            described = [describe_file(f) for f in files]
            for f, (shape, affine) in zip(files[1:], described[1:]):
                shape0, affine0 = described[0]
                if shape != shape0 or not np.allclose(affine, affine0, atol=self.atol):
                    raise InputError(
                        f"{f} does not share the grid of {files[0]} (shape {shape} vs {shape0}, affine differs by "
                        f"{np.abs(affine - affine0).max():.4g} mm); multi-file inputs must be co-registered on one grid"
                    )
            if not self.overwrite:
                subject = str(d[key][0] if isinstance(d[key], (list, tuple)) else d[key])
                for layout in self.layouts:
                    target = Path(layout.filename(subject=subject))
                    if target.exists():
                        raise InputError(f"{target} already exists; remove it or ask to overwrite (overwrite=true)")
        return d


class CheckImaged(MapTransform):
    """Check a loaded, channel-first image: 3-D, the expected channel count, a finite, non-singular affine with voxel
    sizes a scan can have (``check_affine``), not empty (all zeros, or one value everywhere), no infinity.

    ``nan``: ``"zero"`` lets NaN voxels through for ``ZeroNaNd`` (the official preprocessing sets them to 0);
    ``"refuse"`` makes them an error too. ``pixdim``: the spacing the image will be resampled to; when given, a
    resampled grid above ``MAX_RESAMPLED_VOXELS`` is refused before anything is allocated (the resampling checks it
    again itself).
    """

    def __init__(self, keys: KeysCollection, channels: int, nan: str = "zero", pixdim: Sequence[float] | None = None,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels
        self.nan = choice(nan, "nan", NAN_POLICIES)
        self.pixdim = None if pixdim is None else tuple(float(p) for p in pixdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            name = getattr(image, "meta", {}).get("filename_or_obj", key)
            if image.ndim != 4:
                raise InputError(f"{name} has {image.ndim - 1} spatial dimension(s) (shape {tuple(image.shape[1:])}); "
                                 "UniSeg segments 3-D volumes")
            if image.shape[0] != self.channels:
                raise InputError(f"{name} has {image.shape[0]} channel(s), the task takes {self.channels}")
            if isinstance(image, MetaTensor):
                spacing = check_affine(image.affine, name)
                if self.pixdim is not None:
                    check_resampled_size(image.shape[1:], spacing, self.pixdim, name, image.shape[0])
            values = torch.as_tensor(image)
            low, high = torch.aminmax(values) if values.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            if not (torch.isfinite(low) and torch.isfinite(high)):  # one pass; NaN and infinity propagate
                infinite, nan = int(torch.isinf(values).sum()), int(torch.isnan(values).sum())
                if infinite or self.nan == "refuse":
                    what = f"{infinite} infinite" if infinite else f"{nan} NaN"
                    raise InputError(f"{name} has {what} voxel(s); replace them before segmenting"
                                     + ("" if infinite else " (or let them count as 0, as the official "
                                        "preprocessing does: nan=zero)"))
                finite = values[~torch.isnan(values)]
                low, high = torch.aminmax(finite) if finite.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            if low == 0 and high == 0:
                raise InputError(f"{name} is empty (shape {tuple(image.shape[1:])}, no non-zero voxel)")
            if low == high and values[0].numel() > 1:  # one voxel is one value: segmented as it is
                raise InputError(f"{name} is empty: every voxel has the value {float(low):.6g} (shape "
                                 f"{tuple(image.shape[1:])}), there is nothing to segment; check the file")
        return d


class ZeroNaNd(MapTransform):
    """NaN voxels to 0, with one warning that counts them, after the crop and before the resampling: where the
    official preprocessing (nnU-Net v1's ``resample_and_normalize``) does it, so the crop sees them as non-zero."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            nan = torch.isnan(torch.as_tensor(d[key]))
            count = int(nan.sum())
            if count:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                warnings.warn(f"{name}: {count} NaN voxel(s) set to 0, as the official preprocessing does",
                              stacklevel=2)
                d[key] = d[key].masked_fill(nan, 0.0)
        return d


class NormalizeTaskd(MapTransform):
    """The official intensity normalisation of a task, channel by channel (``uniseg_hub.tasks``): a ``Task`` of the
    model's table (an added one too), or an official task's name or id.

    ``ct_window``: clip to [-325, 325] HU and scale to [0, 1]; ``zscore``: per-image (x - mean) / std, over the
    non-zero voxels only (zero outside) for tasks with ``nonzero_mask`` (BraTS) when ``mask`` is ``"training"``
    (as the weights were trained), over the whole image when it is ``"none"`` (as the official ``predict.py``
    does, which disables the masks).
    """

    def __init__(self, keys: KeysCollection, task: int | str | Task, mask: str = "training",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.task = task if isinstance(task, Task) else get_task(task)  # a Task: the model's, maybe added
        low, high = CT_WINDOW
        self.window = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        nonzero = self.task.nonzero_mask and choice(mask, "normalization_mask", NORMALIZATION_MASKS) == "training"
        self.zscore = NormalizeIntensity(nonzero=nonzero, channel_wise=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            # NormalizeIntensity writes into its input: give it a copy, the caller's image stays as it was
            channels = [self.window(c[None]) if scheme == "ct_window" else self.zscore(c[None].clone())
                        for c, scheme in zip(image, self.task.normalization)]
            out = torch.cat([torch.as_tensor(c, dtype=torch.float32) for c in channels], 0)
            d[key] = _like(image, out)
        return d


def _like(reference, array: torch.Tensor):
    """``array`` with ``reference``'s metadata and transform history when the reference is a MetaTensor."""
    if not isinstance(reference, MetaTensor):
        return array
    return MetaTensor(array, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))


class MergeTasksd(MapTransform):
    """The official all-tasks label map, one-hot: per task argmax over its channels, label ``i`` (1-based)
    becomes the task's merged value, later tasks overwrite earlier ones; argmax values beyond the task's labels are
    ignored, as in the official ``predict.py``. Input (sum of ``channels``, *S) probabilities, the tasks' one after
    the other; ``channels`` per task (``UniSeg.output_channels``) defaults to the official shared head's 4 each.
    Output (K, *S) with K = 1 + the largest merged value these tasks can produce (3 for liver alone, 13 for all CT
    tasks, 18 for the official eleven).

    The one-hot map holds only the channels the tasks can produce: the channels above them would be all zero, stay
    zero through the linear resampling back (``resampling.InvertToInputd``), and never win the final argmax (which
    takes the first maximum), so the label map is the same as with all 18 channels, at a fraction of the memory.
    """

    def __init__(self, keys: KeysCollection, tasks: Sequence[Task], allow_missing_keys: bool = False,
                 probabilities: bool = False, channels: Sequence[int] | None = None):
        super().__init__(keys, allow_missing_keys)
        self.tasks = tuple(tasks)
        self.channels = tuple(channels) if channels is not None else (HEAD_CHANNELS,) * len(self.tasks)
        if len(self.channels) != len(self.tasks):
            raise ConfigError(f"MergeTasksd: {len(self.channels)} channel counts for {len(self.tasks)} tasks")
        if len(self.tasks) > 1 and parse_bool(probabilities, "save_probabilities"):
            raise ConfigError(ALL_TASKS_PROBABILITIES)  # the merged one-hot map is no probability map
        self.num_classes = 1 + max((v for t in self.tasks for v in t.merged_labels), default=0)

    def merge(self, probs: torch.Tensor) -> torch.Tensor:
        merged = torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)
        start = 0
        for task, count in zip(self.tasks, self.channels):
            labels = probs[start : start + count].argmax(0)
            start += count
            for index, value in enumerate(task.merged_labels, start=1):
                merged[labels == index] = value
        return merged

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if len(self.tasks) == 1:
            return d  # one task: its own probabilities and labels
        for key in self.key_iterator(d):
            merged = self.merge(torch.as_tensor(d[key]))
            onehot = torch.nn.functional.one_hot(merged, self.num_classes).movedim(-1, 0).float()
            d[key] = _like(d[key], onehot)
        return d


class ArgMaxd(MapTransform):
    """``AsDiscreted(keys, argmax=True)`` for channel-first maps with few channels, without its slow reduction.

    PyTorch's CPU ``argmax`` over the outermost dimension walks the volume with a stride of one channel (23 s for a
    3-channel 512x512x300 map on two cores); this compares the channels elementwise instead (under a second). Same
    output: a (1, *S) float map of the first maximal channel's index, metadata kept. NaN never wins here, unlike
    ``argmax``; probabilities have none. On a GPU (issue 17) the prediction stays there and ``argmax`` runs.
    """

    SLAB_VOXELS = 1 << 18

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            # the plain tensor: a MetaTensor would copy its metadata in each of the many small ops below
            probs = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            if probs.device.type != "cpu":  # a GPU reduces over channels fast: its own argmax (first maximum)
                d[key] = _like(d[key], probs.argmax(0, keepdim=True).to(torch.float32))
                continue
            index = torch.zeros(probs.shape[1:], dtype=torch.float32, device=probs.device)
            step = max(1, self.SLAB_VOXELS // max(1, probs[0, 0].numel()))
            labels = [torch.tensor(float(c), device=probs.device) for c in range(probs.shape[0])]
            for start in range(0, probs.shape[1], step):  # slabs that stay in cache across the channel loop
                slab, out = probs[:, start:start + step], index[start:start + step]
                best = slab[0].clone()
                better = torch.empty_like(best)  # 1.0 where channel c beats the best so far (float: bool ops are slow)
                for c in range(1, slab.shape[0]):
                    torch.gt(slab[c], best, out=better)
                    torch.maximum(best, slab[c], out=best)
                    out.lerp_(labels[c], better)  # exactly c where better is 1, unchanged where 0
            d[key] = _like(d[key], index[None])
        return d
