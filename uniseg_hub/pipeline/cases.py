"""What to segment and with which tasks: datalists, case and output names, input files and their reader."""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import FolderLayoutBase

from ..errors import InputError
from ..tasks import OFFICIAL_TASKS, Task, TaskTable
from .nifti_io import NiftiReader

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


MERGED_CLASSES = OFFICIAL_TASKS.merged_classes
"""Channels of the official one-hot all-tasks map: background plus the 17 merged labels."""


def resolve_tasks(task: int | str, modality: str = "CT", channels: int | None = None,
                  table: TaskTable = OFFICIAL_TASKS) -> tuple[Task, ...]:
    """The tasks of ``table`` (the model's, ``pretrained.model_tasks``) to run: one task, or for ``"all"`` every
    task of the modality group that takes ``channels``.

    For ``"all"`` the group is PET-CT for 2-channel and MR for 4-channel input, else ``modality`` (CT or MR).
    The official code runs all tasks for CT only (its MR and PET-CT branches index tasks that do not exist); this
    runs the matching tasks of every group.
    """
    if str(task).strip().lower() != "all":
        one = table.get(task)
        if channels is not None and channels != one.num_channels:
            raise InputError(
                f"task {one.name} takes {one.num_channels} channel(s) ({', '.join(one.channels)}), but the input has "
                f"{channels}; pass {one.num_channels} file(s) or choose a task for {channels}-channel input"
            )
        return (one,)
    channels = channels or 1
    group = {2: "PET-CT", 4: "MR"}.get(channels, modality)
    chosen = tuple(t for t in table.in_group(group) if t.num_channels == channels)
    if not chosen:
        takes = sorted({t.num_channels for t in table})
        raise InputError(f"no {group} task takes {channels}-channel input; this model's tasks take "
                         f"{', '.join(map(str, takes))} channel(s)")
    return chosen


def task_spacing(tasks: Sequence[Task]) -> tuple[float, float, float]:
    """The spacing to resample to: the first task's; the official all-tasks mode uses one spacing for all."""
    return tasks[0].spacing


def check_dicom_folder(path: str) -> None:
    """A DICOM series folder: read later by MONAI's ITKReader, so ITK must be installed."""
    try:
        import itk  # noqa: F401
    except ImportError as e:
        raise InputError(f"{path} is a folder, read as a DICOM series with ITK, which is not installed; "
                         "pip install itk-io (or uniseg-hub[dicom])") from e
    if not any(os.scandir(path)):
        raise InputError(f"{path} is an empty folder; pass a NIfTI file or a folder holding one DICOM series")


_OPENED: dict[tuple, object] = {}
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 8
"""Inputs whose header was read (``open_image``) and whose voxels were not read yet (``take_image``), by file
identity: the checks before loading (``count_channels``, ``CheckInputFilesd``) and the loading itself
(``CaseReader``) share one ``nibabel.load`` per file. A nibabel image holds its header and the file's name, not
its voxels; the oldest entries go beyond ``_OPENED_MAX`` (checked files that were never loaded)."""


def _identity(path: str) -> tuple:
    """A file's identity for ``_OPENED``: a file replaced or changed since its header was read is read again."""
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def open_image(path: str):
    """The nibabel image of the NIfTI file ``path``: its header, its voxels not read yet (``nibabel.load``, once per
    file until ``take_image`` takes it). InputError for missing or unreadable files."""
    if not os.path.isfile(path):
        raise InputError(f"input {path} does not exist")
    key = _identity(path)
    with _OPENED_LOCK:
        if key in _OPENED:
            return _OPENED[key]
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises several types for foreign or damaged files
        raise InputError(f"cannot read {path} as NIfTI ({type(e).__name__}: {e}); pass a .nii or .nii.gz "
                         "image") from e
    with _OPENED_LOCK:
        while len(_OPENED) >= _OPENED_MAX:
            _OPENED.pop(next(iter(_OPENED)))
        return _OPENED.setdefault(key, image)


def take_image(path: str):
    """The image ``open_image`` read the header of, handed over once (the reader reads its voxels), or a fresh
    ``nibabel.load`` when the file was not opened before."""
    try:
        with _OPENED_LOCK:
            image = _OPENED.pop(_identity(path), None)
    except OSError:
        image = None  # let nibabel say what is wrong with the path
    return nib.load(path) if image is None else image


def describe_file(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) from the header only (``open_image``), with an InputError for missing or unreadable files."""
    image = open_image(path)
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
    shape, _ = describe_file(str(item))
    return shape[3] if len(shape) == 4 else 1


class CaseReader(NiftiReader):
    """``NiftiReader`` that loads the images whose headers the input checks read (``open_image``) without opening
    the files again: one ``nibabel.load`` per input file."""

    def read(self, data, **kwargs):
        if kwargs or self.kwargs:
            return super().read(data, **kwargs)  # nibabel options (mmap...): a load of its own
        from monai.data.utils import correct_nifti_header_if_necessary

        names = [str(n) for n in (data if isinstance(data, (list, tuple)) else [data])]
        self.filenames = names
        images = [correct_nifti_header_if_necessary(take_image(name)) for name in names]
        return images if len(images) > 1 else images[0]


def image_reader(data: Sequence[Mapping], key: str = "image"):
    """MONAI reader for the datalist: ITK for DICOM series folders, nibabel (``CaseReader``) for NIfTI files."""
    first = data[0][key] if data else ""
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return "ITKReader" if os.path.isdir(str(first)) else CaseReader


def case_name(path: str | os.PathLike) -> str:
    """The name of the case a file or DICOM folder holds: its file name without the image suffix (matched
    case-insensitively: ``SCAN.NII.GZ`` is ``SCAN``), or the folder's name. Output files are named after it."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


FIRST_CHANNEL = "_0000"
"""nnU-Net's suffix of a case's first channel file (``case_0000.nii.gz``; then ``_0001`` ...)."""


def output_case_name(path: str | os.PathLike) -> str:
    """The case name outputs are named after: ``case_name`` without nnU-Net's first-channel suffix, so the outputs
    of ``BraTS_001_0000.nii.gz`` .. ``_0003`` (or of a one-channel ``liver_7_0000.nii.gz``) are ``BraTS_001_...``
    (``liver_7_...``), named like the case's label file."""
    name = case_name(path)
    return name[: -len(FIRST_CHANNEL)] if name.endswith(FIRST_CHANNEL) and len(name) > len(FIRST_CHANNEL) else name


class CaseLayout(FolderLayoutBase):
    """Output names, for ``SaveImaged(folder_layout=...)`` and the checks and reports that name outputs:
    ``<output_dir>/<output_case_name(subject)>_<postfix><extension>`` (``SCAN.NII.GZ`` gives ``SCAN_liver.nii.gz``,
    ``case_0000.nii.gz`` ``case_liver.nii.gz``).

    MONAI's ``FolderLayout`` strips a suffix with ``os.path.splitext`` (twice, for a lowercase ``.gz`` only), so it
    would name the outputs of ``SCAN.NII.GZ`` ``SCAN.NII_liver.nii.gz``; this layout takes the case name from
    ``case_name``. ``companion`` names the files that go beside a saved output (preview, volume tables).
    Directories are not created here: the writer creates them (``files.atomic_path``).
    """

    def __init__(self, output_dir: str | os.PathLike, postfix: str = "", extension: str = ".nii.gz"):
        self.output_dir = str(output_dir)
        self.postfix = str(postfix)
        self.extension = extension if not extension or extension.startswith(".") else f".{extension}"

    def filename(self, subject: str | os.PathLike = "case", idx=None, **kwargs) -> str:
        """The output of ``subject`` (an input path: the first file of a multi-file input, or a DICOM folder);
        ``idx`` (a patch index) and ``kwargs`` are appended as MONAI's ``FolderLayout`` does."""
        name = output_case_name(subject)
        for part in (self.postfix, None if idx is None else str(idx)):
            if part:
                name += f"_{part}"
        for k, v in kwargs.items():
            name += f"_{k}-{v}"
        return os.path.join(self.output_dir, name + self.extension)

    def companion(self, saved: str | os.PathLike, name: str) -> str:
        """A file beside the output ``saved`` (a name this layout gave): ``<saved without extension>_<name>``,
        e.g. ``out/SCAN_liver.nii.gz`` and ``preview.png`` give ``out/SCAN_liver_preview.png``."""
        saved = str(saved)
        if self.extension and saved.lower().endswith(self.extension.lower()):
            saved = saved[: -len(self.extension)]
        return f"{saved}_{name}"


def _case_key(path: str) -> str:
    """nnU-Net's channel naming: ``case_0000.nii.gz`` .. ``case_0003.nii.gz`` are channels of ``case``."""
    stem, _, channel = case_name(path).rpartition("_")
    return stem if channel.isdigit() and len(channel) == 4 and stem else case_name(path)


def datalist(input=None, dataset_dir: str | None = None, datalist_file: str | None = None) -> list[dict]:
    """What to segment, as ``[{"image": path or [paths]}, ...]``.

    ``input``: one image path, or a list of paths holding the channels of one image (BraTS, AutoPET).
    ``datalist_file``: a Decathlon-style JSON datalist (``{"testing": [...]}``, else ``"validation"``, read with
    MONAI's ``load_decathlon_datalist``), a plain JSON list of such items, or a CSV file with one case per row
    (``read_datalist``); relative paths are taken from the file's folder. ``dataset_dir``: the cases of a folder
    (``folder_cases``): its images, files named with nnU-Net's ``_0000``, ``_0001`` ... suffixes grouped as the
    channels of one case, or one DICOM series per subfolder.
    """
    if input:
        return [{"image": [str(p) for p in input] if isinstance(input, (list, tuple)) else str(input)}]
    if datalist_file:
        return read_datalist(datalist_file)
    if dataset_dir:
        return folder_cases(dataset_dir)
    return []


DATALIST_SUFFIXES = (".json", ".csv")
"""A single input with one of these suffixes is a datalist (a cohort), not an image."""


def _channels(item: Mapping) -> dict:
    """An item with its channel keys (``image``, or ``image_0``, ``image_1`` ... / ``image1`` ... in their order)
    gathered into ``image`` (one path, or a list of paths)."""
    keys = [k for k in item if str(k).lower().startswith("image") and item[k] not in (None, "")]
    out = {k: v for k, v in item.items() if k not in keys}
    if keys == ["image"]:
        out["image"] = item["image"]
    elif keys:
        paths = []
        for k in keys:
            paths.extend(item[k] if isinstance(item[k], (list, tuple)) else [item[k]])
        out["image"] = paths if len(paths) > 1 else paths[0]
    return out


def read_datalist(path: str | os.PathLike, key: str | None = None) -> list[dict]:
    """The cases of a datalist file, ``[{"image": path or [paths], ...}, ...]``, paths made absolute from the file's
    folder.

    JSON: MONAI's Decathlon datalist (``load_decathlon_datalist``) under ``key`` (default ``testing``, else
    ``validation``; ``test`` too), or a plain list of items or paths. CSV: a header row; the columns whose name
    starts with ``image`` are the case's channels, in column order (``image`` alone for one channel), other columns
    (``label``, ``case``...) are kept as they are. InputError for a missing, unreadable or empty datalist.
    """
    import csv

    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise InputError(f"datalist {path} does not exist")
    base = path.parent
    resolve = lambda p: str(p if os.path.isabs(str(p)) else base / str(p))  # noqa: E731
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
            items = [_channels(row) for row in rows if any(row.values())]
        else:
            content = json.loads(path.read_text())
            if isinstance(content, dict):
                key = key or next((k for k in ("testing", "test", "validation") if k in content), "testing")
                if key not in content:
                    raise InputError(f"datalist {path} has no {key!r} list (it has {', '.join(content) or 'nothing'}); "
                                     "put the cases to segment under \"testing\"")
                listed = content[key]
                if isinstance(listed, list) and all(isinstance(item, dict) for item in listed):
                    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key,
                                                    base_dir=str(base))
                else:  # Decathlon's test lists hold plain paths (MONAI reads those only under "test")
                    items = [{"image": item} if not isinstance(item, dict) else dict(item) for item in listed]
            else:
                items = [{"image": item} if not isinstance(item, dict) else dict(item) for item in content]
            items = [_channels(item) for item in items]
    except (OSError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read the datalist {path} ({type(e).__name__}: {e}); give a Decathlon JSON "
                         "datalist or a CSV file with an image column") from e
    out = []
    for number, item in enumerate(items, 1):
        if "image" not in item:
            raise InputError(f"case {number} of the datalist {path} names no image; give an \"image\" key or column "
                             "(image_0000, image_0001 ... for the channels of multi-channel tasks)")
        value = item["image"]
        item["image"] = [resolve(p) for p in value] if isinstance(value, (list, tuple)) else resolve(value)
        out.append(item)
    if not out:
        raise InputError(f"the datalist {path} lists no case")
    return out


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)


def folder_cases(folder: str | os.PathLike) -> list[dict]:
    """The cases of a folder, sorted by name: its image files (NIfTI...), nnU-Net's ``case_0000.nii.gz`` ...
    ``case_0003.nii.gz`` grouped as the channels of ``case``; and each subfolder that holds a DICOM series (files,
    no image files) as one case."""
    entries = sorted(glob.glob(os.path.join(glob.escape(str(folder)), "*")))
    cases: dict[str, list[str]] = {}
    for f in entries:
        if _is_image(f):
            cases.setdefault(_case_key(f), []).append(f)
        elif os.path.isdir(f) and is_dicom_series_folder(f):
            cases.setdefault(case_name(f), []).append(f)
    return [{"image": fs if len(fs) > 1 else fs[0]} for fs in cases.values()]


def is_dicom_series_folder(folder: str | os.PathLike) -> bool:
    """A folder that holds files and no image file (NIfTI...) nor subfolder with cases: read as one DICOM series."""
    files = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    return any(e.is_file() for e in files) and not any(e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
                                                       for e in files)


def is_cohort(inputs: Sequence[str]) -> bool:
    """Whether ``predict``'s inputs name a set of cases rather than one scan: one datalist file (.json, .csv), a
    glob pattern that is not a file's name, or one folder that is not a DICOM series (images, or series in
    subfolders). One file, one DICOM series folder, or one file per channel is one case."""
    if len(inputs) != 1:
        return False
    path = str(inputs[0])
    if os.path.isfile(path):
        return path.lower().endswith(DATALIST_SUFFIXES)
    if os.path.isdir(path):
        return not is_dicom_series_folder(path) and any(os.scandir(path))
    return glob.has_magic(path)


def discover_cases(inputs: Sequence[str]) -> list[dict]:
    """The cases ``inputs`` name: a datalist's, a folder's (``folder_cases``) or a glob's (images
    and DICOM series folders matched, grouped by nnU-Net's channel naming), sorted and without duplicates.
    InputError when there is none. Inputs that are one case (not ``is_cohort``) give that case alone."""
    if not is_cohort(inputs):
        if not inputs:
            raise InputError("no input given; pass a scan, a folder of scans, a glob or a datalist")
        return [{"image": str(inputs[0]) if len(inputs) == 1 else [str(p) for p in inputs]}]
    path = str(inputs[0])
    if os.path.isfile(path):
        cases = read_datalist(path)
    elif os.path.isdir(path):
        cases = folder_cases(path)
    else:
        grouped: dict[str, list[str]] = {}
        for f in sorted(glob.glob(path, recursive=True)):
            if _is_image(f) or (os.path.isdir(f) and is_dicom_series_folder(f)):
                grouped.setdefault(os.path.join(os.path.dirname(f), _case_key(f)), []).append(f)
        cases = [{"image": fs if len(fs) > 1 else fs[0]} for fs in grouped.values()]
    if not cases:
        raise InputError(f"{path} names no case to segment: give a folder of NIfTI files (or of DICOM series, one per "
                         "subfolder), a glob such as 'scans/*.nii.gz', or a datalist (.json, .csv)")
    seen: dict[str, str] = {}
    for case in cases:
        first = case_subject(case)
        name = case_name(first)
        if name in seen and seen[name] != first:
            raise InputError(f"two cases are both named {name} ({seen[name]} and {first}): their outputs would "
                             "collide in one --out folder; rename one or split the run")
        seen[name] = first
    return cases


def case_subject(item: Mapping) -> str:
    """The input that names a case's outputs: its image, or the first of its channel files."""
    image = item["image"]
    return str(image[0] if isinstance(image, (list, tuple)) else image)


def shard_cases(cases: Sequence, index: int, count: int) -> list:
    """The ``index``-th (0-based) of ``count`` deterministic parts of ``cases``: every ``count``-th case from the
    ``index``-th (MONAI's ``partition_dataset``, no shuffling), so parts differ by at most one case and together
    hold each case once."""
    from monai.data import partition_dataset

    if count <= 1 or not cases:
        return list(cases)
    return list(partition_dataset(list(cases), num_partitions=count, shuffle=False, even_divisible=False)[index])


class GuardedTransform:
    """A cohort's dataset transform: ``transform`` (the bundle's preprocessing) applied to one case, and a case
    that cannot be read or prepared turned into an item that says so (``{"case", "case_error"}``) instead of an
    exception that would end the run over every case. Also records the case's name (``case``), the input that names
    its outputs (``case_subject``) and the seconds its
    loading and preprocessing took (``case_load_seconds``). ``describe(error)`` gives the message (default: the
    error's type and text)."""

    def __init__(self, transform, describe=None):
        self.transform = transform
        self.describe = describe

    def __call__(self, data: Mapping) -> dict:
        import time

        start = time.perf_counter()
        subject = case_subject(data)
        case = case_name(subject)
        try:
            out = self.transform(data)
        except Exception as e:  # any failure is this case's: reported with it, the others go on
            message = self.describe(e) if self.describe is not None else f"{type(e).__name__}: {e}"
            return {"case": case, "case_subject": subject, "case_error": message}
        out = dict(out)
        out["case"], out["case_subject"], out["case_load_seconds"] = case, subject, time.perf_counter() - start
        return out
