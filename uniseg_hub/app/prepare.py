"""Datalists for the paper's downstream datasets, with the official splits, from the folders users download.

Nothing is downloaded or copied: the datalist (``OUT_DIR/datalist.json``, Decathlon style, paths relative to
OUT_DIR) points at the files where they are. It also records what the paper's nnU-Net planning derives from the
data: the target spacing (nnU-Net v1's rule) and, for CT, the foreground intensity statistics of its normalisation.

Recognised layouts (``RAW_DIR`` may be the folder shown or the one above it):

* BTCV (Synapse "Multi-Atlas Labeling Beyond the Cranial Vault", ``RawData.zip``): ``RawData/Training/img/
  img0001.nii.gz`` + ``RawData/Training/label/label0001.nii.gz``; or ``imagesTr/img0001.nii.gz`` +
  ``labelsTr/label0001.nii.gz`` (MONAI's BTCV tutorials); or the official converter's nnU-Net task
  ``Task060_BTCV/imagesTr/bcv_1_0000.nii.gz`` + ``labelsTr/bcv_1.nii.gz``;
* VS (TCIA "Vestibular-Schwannoma-SEG" converted to NIfTI by the VS_Seg scripts, as the official converter reads
  it): ``VS-SEG/vs_gk_1/vs_gk_t1_refT1.nii.gz`` + ``vs_gk_seg_refT1.nii.gz``; or the official converter's nnU-Net
  task ``Task061_VSseg/imagesTr/vs_gk_1_0000.nii.gz`` + ``labelsTr/vs_gk_1.nii.gz``.

Splits (``Downstream/splits_final_*.pkl`` of github yeerwen/UniSeg @ e3ae40d, read with a restricted unpickler):

* BTCV: train bcv_1-10 and bcv_21-31 (21), validation bcv_32-40 (9);
* VS: 193 / 49 of the 242 cases. The official converter sorts the case folder names as strings, shuffles them with
  ``random.seed(1234); random.shuffle`` and takes the first 80% for training; doing that on the 242 names reproduces
  the pickled split exactly (Python 3.11). The validation cases are stored here by number (``VS_VALIDATION``), so a
  tree with only some of the cases still gets the official assignment of each case it has.
"""

from __future__ import annotations

import json as jsonlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import DatasetLayoutError, UnisegHubError
from ..files import write_text_atomic

logger = logging.getLogger(__name__)

BTCV_LABELS = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
               "aorta", "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
               "left adrenal gland")
BTCV_TRAIN = tuple(range(1, 11)) + tuple(range(21, 32))
BTCV_VALIDATION = tuple(range(32, 41))

VS_LABELS = ("background", "vestibular schwannoma")
VS_CASES = tuple(n for n in range(1, 251) if n not in (39, 97, 130, 160, 168, 208, 219, 227))
VS_VALIDATION = (92, 232, 163, 109, 238, 221, 119, 34, 242, 114, 21, 229, 32, 113, 157, 214, 218, 101, 96, 44, 141,
                 94, 134, 209, 246, 213, 248, 28, 181, 83, 61, 105, 102, 154, 183, 57, 121, 118, 4, 33, 106, 239, 66,
                 90, 12, 10, 125, 202, 6)
VS_SEED = 1234
VS_TRAIN_FRACTION = 0.8

DATALIST = "datalist.json"
ANISOTROPY_THRESHOLD = 3.0
FOREGROUND_STRIDE = 10


def vs_official_split(case_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The official converter's VS split rule applied to ``case_names``: sort, seed 1234, shuffle, 80 % training."""
    names = sorted(case_names)
    random.seed(VS_SEED)
    random.shuffle(names)
    cut = int(VS_TRAIN_FRACTION * len(names))
    return names[:cut], names[cut:]


def _listing(folder: Path, limit: int = 8) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in _entries(folder)) if folder.is_dir() else []
    if not entries:
        return "nothing"
    return ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _candidates(raw: Path, *subfolders: str) -> list[Path]:
    """``raw`` and the named folders below it, in that order."""
    return [raw] + [raw / s for s in subfolders]


def _pair_files(images: dict[int, Path], labels: dict[int, Path], where: Path) -> dict[int, tuple[Path, Path]]:
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DatasetLayoutError(f"{where}: {len(missing)} image(s) have no label map (case numbers "
                                 f"{missing[:10]}); every training image needs its label file")
    return {n: (images[n], labels[n]) for n in sorted(images)}


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DatasetLayoutError(f"cannot list {folder} ({e.strerror or e}); check its permissions") from None


def _scan(folder: Path, pattern: str) -> dict[int, Path]:
    found = {}
    for path in _entries(folder):
        match = re.fullmatch(pattern, path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _find_btcv(raw: Path) -> tuple[str, dict[int, tuple[Path, Path]]]:
    for folder in _candidates(raw, "Training", "RawData/Training"):
        if (folder / "img").is_dir() and (folder / "label").is_dir():
            images = _scan(folder / "img", r"img(\d{4})\.nii\.gz")
            if images:
                return "synapse RawData", _pair_files(images, _scan(folder / "label", r"label(\d{4})\.nii\.gz"),
                                                      folder)
    for folder in _candidates(raw, "Task060_BTCV"):
        if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
            for layout, image_re, label_re in (("imagesTr/imgNNNN", r"img(\d{4})\.nii\.gz", r"label(\d{4})\.nii\.gz"),
                                               ("nnU-Net Task060", r"bcv_(\d+)_0000\.nii\.gz", r"bcv_(\d+)\.nii\.gz")):
                images = _scan(folder / "imagesTr", image_re)
                if images:
                    return layout, _pair_files(images, _scan(folder / "labelsTr", label_re), folder)
    raise DatasetLayoutError(
        f"{raw} does not look like BTCV: expected RawData/Training/img/img0001.nii.gz with "
        "RawData/Training/label/label0001.nii.gz (Synapse RawData.zip), imagesTr/img0001.nii.gz with "
        "labelsTr/label0001.nii.gz, or imagesTr/bcv_1_0000.nii.gz with labelsTr/bcv_1.nii.gz (nnU-Net Task060); "
        f"found {_listing(raw)}"
    )


def _find_vs(raw: Path) -> tuple[str, dict[int, tuple[Path, Path]]]:
    for folder in [f for f in _candidates(raw, "VS-SEG") if f.is_dir()]:
        cases = {int(m.group(1)): p for p in _entries(folder) if p.is_dir()
                 and (m := re.fullmatch(r"vs_gk_(\d+)", p.name))}
        if cases:
            images = {n: p / "vs_gk_t1_refT1.nii.gz" for n, p in cases.items()
                      if (p / "vs_gk_t1_refT1.nii.gz").is_file()}
            if not images:
                raise DatasetLayoutError(
                    f"{folder} has vs_gk_N case folders but none holds vs_gk_t1_refT1.nii.gz; convert the TCIA DICOM "
                    "data with the VS_Seg scripts (T1 image and T1-space segmentation), as the official code expects"
                )
            labels = {n: p / "vs_gk_seg_refT1.nii.gz" for n, p in cases.items()
                      if (p / "vs_gk_seg_refT1.nii.gz").is_file()}
            return "VS_Seg folders", _pair_files(images, labels, folder)
    for folder in _candidates(raw, "Task061_VSseg"):
        if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
            images = _scan(folder / "imagesTr", r"vs_gk_(\d+)_0000\.nii\.gz")
            if images:
                return "nnU-Net Task061", _pair_files(images, _scan(folder / "labelsTr", r"vs_gk_(\d+)\.nii\.gz"),
                                                      folder)
    raise DatasetLayoutError(
        f"{raw} does not look like the vestibular schwannoma data (VS-SEG): expected case folders "
        "vs_gk_1/vs_gk_t1_refT1.nii.gz with vs_gk_seg_refT1.nii.gz (TCIA data converted by the VS_Seg scripts), or "
        f"imagesTr/vs_gk_1_0000.nii.gz with labelsTr/vs_gk_1.nii.gz (nnU-Net Task061); found {_listing(raw)}"
    )


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """nnU-Net v1's target spacing (``ExperimentPlanner3D_v21.get_target_spacing``): the median spacing, except
    that on strongly anisotropic data (coarsest axis > 3x the finest, and < 1/3 as many voxels) the coarse axis
    takes the 10th percentile of its spacings (not below the finer axes' spacing). Axes in MONAI order."""
    spacings = np.asarray(spacings, dtype=float)
    shapes = np.asarray(shapes, dtype=float)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * min(target[others])
    aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min(target_size[others])
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(spacings[:, worst], 10)
        if coarse < min(target[others]):
            coarse = max(min(target[others]), coarse) + 1e-5
        target[worst] = coarse
    return [round(float(s), 5) for s in target]


def _load(path: Path, case: str, what: str):
    """The NIfTI image at ``path`` (the ``what`` of ``case``), header checked; ``DatasetLayoutError`` naming the case
    and the file otherwise."""
    try:
        image = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for damaged or unreadable files
        raise DatasetLayoutError(f"case {case}: cannot read its {what} {path} as NIfTI ({type(e).__name__}: {e}); "
                                 "extract or download the dataset again, or remove the case") from None
    shape = image.shape
    if len(shape) != 3 and not (len(shape) > 3 and all(n == 1 for n in shape[3:])):
        raise DatasetLayoutError(f"case {case}: its {what} {path} has shape {shape}, not a 3-D volume; "
                                 "the downstream datasets hold one 3-D image and one 3-D label map per case")
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    if not (np.isfinite(zooms).all() and (zooms > 0).all()) or not np.isfinite(image.affine).all():
        raise DatasetLayoutError(f"case {case}: its {what} {path} has voxel size {zooms.tolist()} or a non-finite "
                                 "affine; correct its header or remove the case")
    return image


def _voxels(image, path: Path, case: str, what: str) -> np.ndarray:
    try:
        return np.asanyarray(image.dataobj).reshape(image.shape[:3])
    except Exception as e:  # truncated or corrupted data: EOFError, zlib.error, OSError, ValueError
        raise DatasetLayoutError(f"case {case}: the voxels of its {what} {path} cannot be read ({type(e).__name__}: "
                                 f"{e}); the file is damaged: extract or download the dataset again, or remove the "
                                 "case") from None


def check_case(case: str, image_path: Path, label_path: Path, num_labels: int,
               intensities: bool = False) -> tuple[list[float], list[int], np.ndarray | None]:
    """Read one case and check it: both files are readable 3-D NIfTI volumes on one voxel grid (shape and affine),
    and the label map holds only whole numbers from 0 to ``num_labels - 1``. Returns (spacing, shape, every
    ``FOREGROUND_STRIDE``-th foreground intensity when ``intensities``, else None); ``DatasetLayoutError`` naming
    the case, the file and the fix otherwise."""
    image = _load(image_path, case, "image")
    label = _load(label_path, case, "label map")
    if image.shape[:3] != label.shape[:3] or not np.allclose(image.affine, label.affine, rtol=1e-4, atol=1e-3):
        how = "their affines differ" if image.shape[:3] == label.shape[:3] else \
            f"shape {label.shape[:3]} != {image.shape[:3]}"
        raise DatasetLayoutError(
            f"case {case}: the label map {label_path} is not on the voxel grid of the image {image_path} ({how}); "
            "they must share one grid: resample the label map onto the image (nearest neighbour) or remove the case")
    seg = _voxels(label, label_path, case, "label map")
    low, high = (float(seg.min()), float(seg.max())) if seg.size else (0.0, 0.0)
    whole = np.issubdtype(seg.dtype, np.integer) or bool(np.isfinite(seg).all() and (seg == np.round(seg)).all())
    if not whole or low < 0 or high > num_labels - 1:
        raise DatasetLayoutError(
            f"case {case}: the label map {label_path} holds values from {low:g} to {high:g}"
            f"{'' if whole else ' (not all whole numbers)'}, but the dataset's labels are the whole numbers 0 to "
            f"{num_labels - 1}; use the dataset's own label files (or remove the case)")
    spacing = [float(z) for z in image.header.get_zooms()[:3]]
    samples = None
    if intensities:
        data = _voxels(image, image_path, case, "image")
        samples = np.asarray(data[seg > 0], dtype=np.float64)[::FOREGROUND_STRIDE]
    return spacing, [int(n) for n in image.shape[:3]], samples


def foreground_intensity(samples: Iterable[np.ndarray]) -> dict[str, float]:
    """nnU-Net v1's CT intensity properties from every 10th foreground voxel (label > 0) of every case
    (``check_case``), pooled: their mean, standard deviation and 0.5 / 99.5 percentiles."""
    samples = list(samples)
    voxels = np.concatenate(samples) if samples else np.zeros(0)
    if voxels.size == 0:
        raise DatasetLayoutError("the label maps hold no foreground voxel; the intensity statistics need labelled "
                                 "organs")
    return {"mean": float(voxels.mean()), "std": float(voxels.std()),
            "percentile_00_5": float(np.percentile(voxels, 0.5)),
            "percentile_99_5": float(np.percentile(voxels, 99.5)), "voxels": int(voxels.size)}


def _relative(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def _write(out_dir: str | os.PathLike, content: dict, overwrite: bool) -> Path:
    out = Path(out_dir)
    target = out / DATALIST
    if target.exists() and not overwrite:
        raise UnisegHubError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    write_text_atomic(target, jsonlib.dumps(content, indent=2) + "\n")
    return target


def _datalist(name: str, description: str, reference: str, modality: str, labels: Sequence[str], layout: str,
              raw: Path, out: Path, split: str, cases: dict[str, tuple[Path, Path]], train: Sequence[str],
              validation: Sequence[str], intensity: Callable | None) -> dict:
    if not cases:
        raise DatasetLayoutError(f"{raw} holds no case; pass the folder where the downloaded dataset was extracted")
    checked = [check_case(case, image, label, len(labels), intensities=intensity is not None)
               for case, (image, label) in cases.items()]
    properties = {"target_spacing": target_spacing([c[0] for c in checked], [c[1] for c in checked]),
                  "median_shape": [int(v) for v in np.median([c[1] for c in checked], axis=0)]}
    if intensity is not None:
        properties["intensity"] = intensity(c[2] for c in checked)

    def entries(names):
        return [{"case": n, "image": _relative(cases[n][0], out), "label": _relative(cases[n][1], out)}
                for n in names]

    return {
        "name": name, "description": description, "reference": reference,
        "modality": {"0": modality}, "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": len(train), "numValidation": len(validation),
        "split": split, "source": {"raw_dir": str(raw.resolve()), "layout": layout},
        "properties": properties,
        "training": entries(train), "validation": entries(validation),
    }


def _checked_raw(raw_dir: str | os.PathLike) -> Path:
    raw = Path(raw_dir)
    if not raw.is_dir():
        raise DatasetLayoutError(f"{raw} is not a folder; pass the folder where the downloaded dataset was extracted")
    return raw


def prepare_btcv(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``OUT_DIR/datalist.json`` for BTCV with the official 21 / 9 split; returns its path.

    Also computes the target spacing and the CT foreground intensity statistics over all 30 cases, as nnU-Net's
    planning (which the paper used) does over its whole training folder; this reads every image once.
    """
    raw = _checked_raw(raw_dir)
    layout, found = _find_btcv(raw)
    official = set(BTCV_TRAIN) | set(BTCV_VALIDATION)
    unknown = sorted(set(found) - official)
    if unknown:
        raise DatasetLayoutError(
            f"{raw} holds cases {unknown} outside BTCV's 30 labelled training cases (1-10, 21-40); the official "
            "split does not cover them: remove them (BTCV's Testing images have no public labels)"
        )
    cases = {f"bcv_{n}": found[n] for n in sorted(found)}
    _warn_missing("BTCV", [f"bcv_{n}" for n in sorted(official - set(found))])
    train = [f"bcv_{n}" for n in BTCV_TRAIN if n in found]
    validation = [f"bcv_{n}" for n in BTCV_VALIDATION if n in found]
    _require_both(train, validation, raw)
    content = _datalist(
        "BTCV", "Multi-Atlas Labeling Beyond the Cranial Vault, abdomen CT, 13 organs",
        "https://www.synapse.org/#!Synapse:syn3193805/wiki/217789", "CT", BTCV_LABELS, layout, raw, Path(out_dir),
        "official UniSeg split (Downstream/splits_final_BTCV.pkl): training bcv_1-10 and bcv_21-31, "
        "validation bcv_32-40", cases, train, validation, foreground_intensity)
    return _write(out_dir, content, overwrite)


def prepare_vs(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``OUT_DIR/datalist.json`` for VS (T1 image, T1-space tumour label) with the official 193 / 49 split."""
    raw = _checked_raw(raw_dir)
    layout, found = _find_vs(raw)
    unknown = sorted(set(found) - set(VS_CASES))
    if unknown:
        raise DatasetLayoutError(
            f"{raw} holds cases {['vs_gk_%d' % n for n in unknown]} that are not among the 242 cases of the official "
            "split; remove them"
        )
    cases = {f"vs_gk_{n}": found[n] for n in sorted(found)}
    _warn_missing("VS", [f"vs_gk_{n}" for n in VS_CASES if n not in found])
    validation = [f"vs_gk_{n}" for n in sorted(set(VS_VALIDATION) & set(found))]
    train = [f"vs_gk_{n}" for n in sorted(set(found) - set(VS_VALIDATION))]
    _require_both(train, validation, raw)
    content = _datalist(
        "Vestibular-Schwannoma-SEG", "contrast-enhanced T1 MR, vestibular schwannoma",
        "https://wiki.cancerimagingarchive.net/pages/viewpage.action?pageId=70229053", "T1", VS_LABELS, layout, raw,
        Path(out_dir),
        f"official UniSeg split (Downstream/splits_final_VS.pkl): the 242 case names sorted, random.seed({VS_SEED}), "
        "random.shuffle, first 193 training, last 49 validation", cases, train, validation, None)
    return _write(out_dir, content, overwrite)


def _warn_missing(dataset: str, missing: Sequence[str]) -> None:
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        logger.warning("%d case(s) of the official %s split are missing (%s); the datalist holds the others with "
                       "their official assignment", len(missing), dataset, shown)


def _require_both(train: Sequence[str], validation: Sequence[str], raw: Path) -> None:
    if not train or not validation:
        side = "training" if not train else "validation"
        raise DatasetLayoutError(f"{raw} has no case of the official {side} split; fine-tuning needs both sides")


PREPARERS = {"btcv": prepare_btcv, "vs": prepare_vs}


def prepare(dataset: str, raw_dir: str, out_dir: str, *, overwrite: bool = False) -> dict:
    """Write a datalist with the paper's official split for a downstream dataset you downloaded (nothing is fetched).

    OUT_DIR/datalist.json lists the images and labels where they are (paths relative to OUT_DIR), the split, the
    label names, and what training derives from the data (target spacing; CT intensity statistics). Then train with
    python -m monai.bundle run --config_file "['configs/train.json','configs/btcv.json']" --dataset_dir OUT_DIR

    Args:
        dataset: btcv (Synapse RawData, imagesTr/imgNNNN or nnU-Net Task060 layout) or vs (VS_Seg vs_gk_N folders
            or nnU-Net Task061 layout).
        raw_dir: the folder you extracted the dataset into.
        out_dir: where to write datalist.json.
        overwrite: replace an existing datalist.json.

    Returns ``{"datalist", "training", "validation", "layout", "properties"}``.
    """
    key = str(dataset).strip().lower()
    if key not in PREPARERS:
        raise UnisegHubError(f"unknown dataset {dataset!r}; prepare knows: {', '.join(PREPARERS)}")
    path = PREPARERS[key](raw_dir, out_dir, overwrite=bool(overwrite))
    content = jsonlib.loads(path.read_text())
    result = {"datalist": str(path), "training": content["numTraining"], "validation": content["numValidation"],
              "layout": content["source"]["layout"], "properties": content["properties"]}
    return result
