"""The pieces of UniSeg inference that MONAI does not have; the bundle's ``inference.json`` wires them with MONAI's.

* ``TaskPredictor``: the network as the sliding-window inferer sees it: softmax over the head, the task's classes,
  8-flip mirror test-time augmentation averaged over probabilities (as nnU-Net v1 does), and the all-tasks mode with
  the encoder computed once per window and shared by the tasks;
* ``CheckInputFilesd`` / ``CheckImaged``: one clear error for each kind of bad input, before any output exists;
* ``NormalizeTaskd``: per-channel normalisation from the task table (AutoPET mixes a CT window and a PET z-score);
* ``MergeTasksd``: the official all-tasks label map (per task argmax, later tasks overwrite earlier ones);
* ``datalist``, ``resolve_tasks``: what to segment and with which tasks;
* ``retain_freed_memory``: keep freed memory in the process for reuse (a CPU speed switch of the bundle);
* ``ArgMaxd``: ``AsDiscreted(argmax=True)`` without PyTorch's slow outer-dimension CPU argmax.
"""

from __future__ import annotations

import ctypes
import glob
import itertools
import json
import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayout, MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRange
from torch import nn

from .errors import UnisegHubError
from .nifti_io import NiftiReader
from .tasks import CT_WINDOW, GROUPS, HEAD_CHANNELS, Task, get_task, tasks_in_group

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
MERGED_CLASSES = 1 + max(v for g in GROUPS for t in tasks_in_group(g) for v in t.merged_labels)
"""Channels of the one-hot all-tasks map: background plus the 17 merged labels."""


class InputError(UnisegHubError, ValueError):
    """An input image that cannot be segmented as given (missing, unreadable, wrong shape or values)."""


def as_bool(value) -> bool:
    """A switch from a config or command line: ``"false"``, ``"no"``, ``"0"`` and ``"off"`` are False."""
    if isinstance(value, str):
        if value.strip().lower() in ("true", "yes", "1", "on"):
            return True
        if value.strip().lower() in ("false", "no", "0", "off", ""):
            return False
        raise InputError(f"{value!r} is not a switch value; use true or false")
    return bool(value)


def resolve_tasks(task: int | str, modality: str = "CT", channels: int | None = None) -> tuple[Task, ...]:
    """The tasks to run: one task, or for ``"all"`` every task of the modality group that takes ``channels``.

    For ``"all"`` the group is PET-CT for 2-channel and MR for 4-channel input, else ``modality`` (CT or MR).
    The official code runs all tasks for CT only (its MR and PET-CT branches index tasks that do not exist); this
    runs the matching tasks of every group.
    """
    if str(task).strip().lower() != "all":
        one = get_task(task)
        if channels is not None and channels != one.num_channels:
            raise InputError(
                f"task {one.name} takes {one.num_channels} channel(s) ({', '.join(one.channels)}), but the input has "
                f"{channels}; pass {one.num_channels} file(s) or choose a task for {channels}-channel input"
            )
        return (one,)
    channels = channels or 1
    group = {2: "PET-CT", 4: "MR"}.get(channels, modality)
    chosen = tuple(t for t in tasks_in_group(group) if t.num_channels == channels)
    if not chosen:
        raise InputError(f"no {group} task takes {channels}-channel input; UniSeg takes 1 (CT, MR), 2 (CT+PET) or 4 "
                         "(BraTS MR) channels")
    return chosen


def task_spacing(tasks: Sequence[Task]) -> tuple[float, float, float]:
    """The spacing to resample to: the first task's; the official all-tasks mode uses one spacing for all."""
    return tasks[0].spacing


class TaskPredictor(nn.Module):
    """Wraps ``UniSeg`` for a sliding-window inferer: (B, C, *patch) image -> (B, K, *patch) probabilities.

    Args:
        model: a ``UniSeg`` in eval mode.
        tasks: one task, or several for the all-tasks mode (the encoder runs once per window and flip).
        mirror: 8-flip mirror test-time augmentation (flip every subset of the three axes, average the softmax),
            on by default as in the official inference.
        crop_classes: keep the task's first C_t channels of the softmax (the official single-task output, K = C_t);
            off keeps all head channels. The all-tasks mode always returns all head channels of every task
            (K = 4 x tasks), because the official merge takes the argmax over all of them.
        amp: autocast to float16 on CUDA (the official default there).
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], mirror: bool = True, crop_classes: bool = True,
                 amp: bool = False):
        super().__init__()
        self.model = model
        self.tasks = tuple(tasks)
        self.flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] \
            if as_bool(mirror) else [()]
        self.crop = as_bool(crop_classes) and len(self.tasks) == 1
        self.amp = as_bool(amp)

    @property
    def out_channels(self) -> int:
        return self.tasks[0].num_classes if self.crop else HEAD_CHANNELS * len(self.tasks)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad: inference only, and it lets the network take its CPU fast path (``uniseg_hub.fast_path``)
        total = None
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and x.is_cuda)
        for axes in self.flips:
            flipped = torch.flip(x, axes) if axes else x
            with autocast:
                logits = self.model.decode_tasks(self.model.encode(flipped), [t.id for t in self.tasks])
                probs = [one.float().softmax(1) for one in logits]
            probs = torch.cat(probs, 1)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total.add_(probs)
        total /= len(self.flips)
        return total[:, : self.out_channels] if self.crop else total


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_GLIBC_DEFAULT_MMAP_MAX = 65536


def retain_freed_memory(enabled: bool = True) -> bool:
    """Keep freed memory in this process for reuse instead of returning it to the system (glibc malloc only).

    By default glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it when freed, so each
    full-resolution tensor of each sliding window (300-600 MB for the (192, 192, 64) patch) is faulted in page by
    page from zeroed kernel pages again: on CPU that is a large share of a forward pass (``benchmarks/NOTES.md``).
    With ``enabled`` large blocks come from the heap and freed ones are kept, so later windows reuse warm pages.
    The process's resident memory then stays at its peak instead of shrinking after it. Process-wide: the bundle
    calls it once at start (``retain_freed_memory`` in ``inference.json``; ``false`` there changes nothing).
    Returns whether the setting took effect (False when not enabled, or off Linux/glibc).
    """
    global _RETAINING
    libc = _glibc()
    if not as_bool(enabled) or libc is None:
        return False
    _RETAINING = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _RETAINING


_RETAINING = False


def release_freed_memory() -> None:
    """After the network phase: hand the memory ``retain_freed_memory`` kept back to the system (``malloc_trim``).

    The freed blocks of the sliding windows are of no use to the resampling back to the input grid, whose blocks
    have other sizes; without this they would add to the peak. A no-op unless ``retain_freed_memory`` is in effect.
    """
    if _RETAINING:
        _glibc().malloc_trim(0)


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, ...)
        return None


def _glibc_default_malloc() -> None:
    """Undo ``retain_freed_memory`` for blocks allocated from now on (for benchmarks and tests)."""
    global _RETAINING
    libc = _glibc()
    _RETAINING = False
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)  # hand back what was retained, so it is not reused warm


def _check_dicom_folder(path: str) -> None:
    """A DICOM series folder: read later by MONAI's ITKReader, so ITK must be installed."""
    try:
        import itk  # noqa: F401
    except ImportError as e:
        raise InputError(f"{path} is a folder, read as a DICOM series with ITK, which is not installed; "
                         "pip install itk-io (or uniseg-hub[dicom])") from e
    if not any(os.scandir(path)):
        raise InputError(f"{path} is an empty folder; pass a NIfTI file or a folder holding one DICOM series")


def _describe_file(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) from the header only, with an InputError for missing or unreadable files."""
    if not os.path.isfile(path):
        raise InputError(f"input {path} does not exist")
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises several types for foreign or damaged files
        raise InputError(f"cannot read {path} as NIfTI ({type(e).__name__}: {e}); pass a .nii or .nii.gz image") \
            from e
    return tuple(int(n) for n in image.shape), image.affine


def count_channels(data: Sequence[Mapping], key: str = "image") -> int:
    """Channels of the first datalist item: one per file, or the 4th axis of a single 4-D file."""
    if not data:
        raise InputError("nothing to segment: give an input image (--input) or a folder with images (--dataset_dir)")
    item = data[0][key]
    if isinstance(item, (list, tuple)):
        return len(item)
    if os.path.isdir(str(item)):
        return 1  # a DICOM series
    shape, _ = _describe_file(str(item))
    return shape[3] if len(shape) == 4 else 1


def image_reader(data: Sequence[Mapping], key: str = "image"):
    """MONAI reader for the datalist: ITK for DICOM series folders, nibabel (``NiftiReader``) for NIfTI files."""
    first = data[0][key] if data else ""
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return "ITKReader" if os.path.isdir(str(first)) else NiftiReader


class CheckInputFilesd(MapTransform):
    """Check an input before loading it: files exist and read as NIfTI, multi-file inputs share one grid, and the
    output it will produce does not exist yet (unless ``overwrite``), so no work is done that cannot be saved.

    Multi-channel tasks (BraTS: four MR sequences, AutoPET: CT and PET) take one file per channel; their shapes must
    be equal and their affines equal within ``atol`` millimetres. ``output_dir`` and ``output_postfix`` name the
    output as ``SaveImaged`` will (``<output_dir>/<first file's name>_<postfix>.nii.gz``).
    """

    def __init__(self, keys: KeysCollection, output_dir: str | None = None, output_postfix: str = "",
                 overwrite: bool = True, atol: float = 1e-3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.layout = FolderLayout(output_dir, output_postfix, ".nii.gz", makedirs=False) if output_dir else None
        self.overwrite = as_bool(overwrite)
        self.atol = atol

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            files = [str(f) for f in (d[key] if isinstance(d[key], (list, tuple)) else [d[key]])]
            if not files:
                raise InputError("an input with no files; give one file per channel")
            if len(files) == 1 and os.path.isdir(files[0]):
                _check_dicom_folder(files[0])
                files = []
            described = [_describe_file(f) for f in files]
            for f, (shape, affine) in zip(files[1:], described[1:]):
                shape0, affine0 = described[0]
                if shape != shape0 or not np.allclose(affine, affine0, atol=self.atol):
                    raise InputError(
                        f"{f} does not share the grid of {files[0]} (shape {shape} vs {shape0}, affine differs by "
                        f"{np.abs(affine - affine0).max():.4g} mm); multi-file inputs must be co-registered on one grid"
                    )
            if self.layout is not None and not self.overwrite:
                target = Path(self.layout.filename(subject=str(d[key][0] if isinstance(d[key], (list, tuple))
                                                               else d[key])))
                if target.exists():
                    raise InputError(f"{target} already exists; remove it or ask to overwrite (overwrite=true)")
        return d


class CheckImaged(MapTransform):
    """Check a loaded, channel-first image: 3-D, the expected channel count, not empty, finite."""

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = channels

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
            values = torch.as_tensor(image)
            low, high = torch.aminmax(values) if values.numel() else (torch.tensor(0.0), torch.tensor(0.0))
            if not (torch.isfinite(low) and torch.isfinite(high)):  # one pass; NaN and infinity propagate
                bad = int((~torch.isfinite(values)).sum())
                raise InputError(f"{name} has {bad} non-finite voxel(s) (NaN or infinity); replace them before "
                                 "segmenting")
            if low == 0 and high == 0:
                raise InputError(f"{name} is empty (shape {tuple(image.shape[1:])}, no non-zero voxel)")
        return d


class NormalizeTaskd(MapTransform):
    """The official intensity normalisation of a task, channel by channel (``uniseg_hub.tasks``).

    ``ct_window``: clip to [-325, 325] HU and scale to [0, 1]; ``zscore``: per-image (x - mean) / std, over the
    non-zero voxels only (zero outside) for tasks with ``nonzero_mask`` (BraTS).
    """

    def __init__(self, keys: KeysCollection, task: int | str | Task, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.task = get_task(task)
        low, high = CT_WINDOW
        self.window = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        self.zscore = NormalizeIntensity(nonzero=self.task.nonzero_mask, channel_wise=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = [self.window(c[None]) if scheme == "ct_window" else self.zscore(c[None])
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
    """The official all-tasks label map, one-hot: per task argmax over its head channels, label ``i`` (1-based)
    becomes the task's merged value, later tasks overwrite earlier ones; argmax values beyond the task's labels are
    ignored, as in the official ``predict.py``. Input (4 x tasks, *S) probabilities, output (K, *S) with
    K = 1 + the largest merged value these tasks can produce (3 for liver alone, 13 for all CT tasks, at most 18).

    The one-hot map holds only the channels the tasks can produce: the channels above them would be all zero, stay
    zero through the linear resampling back (``resampling.InvertToInputd``), and never win the final argmax (which
    takes the first maximum), so the label map is the same as with all 18 channels, at a fraction of the memory.
    """

    def __init__(self, keys: KeysCollection, tasks: Sequence[Task], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.tasks = tuple(tasks)
        self.num_classes = 1 + max((v for t in self.tasks for v in t.merged_labels), default=0)

    def merge(self, probs: torch.Tensor) -> torch.Tensor:
        merged = torch.zeros(probs.shape[1:], dtype=torch.long, device=probs.device)
        for k, task in enumerate(self.tasks):
            labels = probs[k * HEAD_CHANNELS : (k + 1) * HEAD_CHANNELS].argmax(0)
            for index, value in enumerate(task.merged_labels, start=1):
                merged[labels == index] = value
        return merged

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        # the first step after the sliding window: the network's retained memory is no longer needed
        release_freed_memory()
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
    ``argmax``; probabilities have none.
    """

    SLAB_VOXELS = 1 << 18

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            # the plain tensor: a MetaTensor would copy its metadata in each of the many small ops below
            probs = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
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


def _case_key(path: str) -> str:
    """nnU-Net's channel naming: ``case_0000.nii.gz`` .. ``case_0003.nii.gz`` are channels of ``case``."""
    name = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem, _, channel = name.rpartition("_")
    return stem if channel.isdigit() and len(channel) == 4 and stem else name


def datalist(input=None, dataset_dir: str | None = None, datalist_file: str | None = None) -> list[dict]:
    """What to segment, as ``[{"image": path or [paths]}, ...]``.

    ``input``: one image path, or a list of paths holding the channels of one image (BraTS, AutoPET).
    ``datalist_file``: a JSON list of such dicts (or ``{"testing": [...]}`` as in Decathlon datalists); relative
    paths are taken from the file's folder. ``dataset_dir``: every image in the folder; files named with nnU-Net's
    ``_0000``, ``_0001`` ... suffixes are grouped as the channels of one case.
    """
    if input:
        return [{"image": [str(p) for p in input] if isinstance(input, (list, tuple)) else str(input)}]
    if datalist_file:
        base = Path(datalist_file).parent
        items = json.loads(Path(datalist_file).read_text())
        items = items.get("testing", items.get("validation", [])) if isinstance(items, dict) else items
        resolve = lambda p: str(p if os.path.isabs(p) else base / p)  # noqa: E731
        out = []
        for item in items:
            item = {"image": item} if not isinstance(item, dict) else dict(item)
            for key in ("image", "label"):
                if key in item:
                    value = item[key]
                    item[key] = [resolve(p) for p in value] if isinstance(value, list) else resolve(value)
            out.append(item)
        return out
    if dataset_dir:
        files = sorted(f for f in glob.glob(os.path.join(dataset_dir, "*")) if f.endswith(IMAGE_SUFFIXES))
        cases: dict[str, list[str]] = {}
        for f in files:
            cases.setdefault(_case_key(f), []).append(f)
        return [{"image": fs if len(fs) > 1 else fs[0]} for fs in cases.values()]
    return []
