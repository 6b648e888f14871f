"""``uniseg-hub evaluate``: score saved label maps against reference labels and write the evaluation report.

The report is the one the bundle writes (``training.evaluation.write_report``: per case and label Dice, HD95 and
normalised surface Dice with MONAI's metrics, mean and standard deviation, JSON, CSV and a box plot PNG), so a
folder of ``uniseg-hub predict`` outputs and a ``monai.bundle run evaluate`` give the same files.

Pairs come from a predictions folder and a labels folder (a prediction ``<case>.nii.gz`` or ``<case>_<anything>
.nii.gz``, as predict names it, goes with the label ``<case>.nii.gz``), or from a datalist JSON of
``{"pred": ..., "label": ...}`` items (a list, or under ``"testing"``; relative paths from the file's folder).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..pipeline.cases import IMAGE_SUFFIXES, case_name
from ..tasks import OFFICIAL_TASKS, TaskTable

logger = logging.getLogger(__name__)

NOT_PREDICTIONS = ("_probabilities",)
"""File name endings (before the suffix) of predict's other image outputs, never scored."""


@dataclass(frozen=True)
class Pair:
    case: str
    pred: str
    label: str


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and any(p.name.lower().endswith(s) for s in
                                                                     IMAGE_SUFFIXES))


def pairs_from_folders(predictions: str | os.PathLike, labels: str | os.PathLike,
                       task: str | None = None) -> list[Pair]:
    """Match the label maps of ``predictions`` with the references of ``labels`` by case name."""
    pred_dir, label_dir = Path(predictions), Path(labels)
    for what, folder in (("predictions", pred_dir), ("labels", label_dir)):
        if not folder.is_dir():
            raise InputError(f"the {what} folder {folder} does not exist or is not a folder")
    references = {case_name(p): p for p in _images(label_dir)}
    if not references:
        raise InputError(f"no label files ({', '.join(IMAGE_SUFFIXES)}) in {label_dir}")
    found: dict[str, list[Path]] = {}
    unmatched = []
    for p in _images(pred_dir):
        name = case_name(p)
        if name.endswith(NOT_PREDICTIONS):
            continue
        cases = [c for c in references if name == c or name.startswith(c + "_")]
        if not cases:
            unmatched.append(p.name)
            continue
        found.setdefault(max(cases, key=len), []).append(p)
    pairs = []
    for case, preds in sorted(found.items()):
        if len(preds) > 1 and task:
            preds = [p for p in preds if case_name(p) in (case, f"{case}_{task}")] or preds
        if len(preds) > 1:
            raise InputError(f"{len(preds)} predictions for case {case} ({', '.join(p.name for p in preds)}); give "
                             "--task to pick <case>_<task>, or keep one prediction per case in the folder")
        pairs.append(Pair(case, str(preds[0]), str(references[case])))
    if unmatched:
        logger.warning("%d prediction(s) without a label of the same case, not scored: %s", len(unmatched),
                       ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else ""))
    missing = sorted(set(references) - set(found))
    if missing and pairs:
        logger.warning("%d label(s) without a prediction, not scored: %s", len(missing),
                       ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if not pairs:
        raise InputError(f"no prediction in {pred_dir} matches a label in {label_dir}: a prediction must be named "
                         "<case>.nii.gz or <case>_<task>.nii.gz for the label <case>.nii.gz")
    return pairs


def pairs_from_datalist(datalist: str | os.PathLike) -> list[Pair]:
    """The ``{"pred": ..., "label": ...}`` items of a datalist JSON (a list, or a dict with ``"testing"``)."""
    path = Path(datalist)
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"the datalist {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(items, dict):
        items = items.get("testing", items.get("validation"))
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) and {"pred", "label"} <= set(i)
                                                           for i in items):
        raise InputError(f"the datalist {path} must hold a non-empty list (or \"testing\": [...]) of "
                         '{"pred": PREDICTION, "label": REFERENCE} items')
    pairs = []
    for item in items:
        pred, label = (str(p if Path(p).is_absolute() else path.parent / p) for p in (item["pred"], item["label"]))
        for p in (pred, label):
            if not Path(p).is_file():
                raise InputError(f"{p} (in the datalist {path}) does not exist")
        pairs.append(Pair(case_name(label), pred, label))
    return pairs


def guess_task(pairs: list[Pair], table: TaskTable = OFFICIAL_TASKS) -> str | None:
    """The task of ``table`` named in every prediction's file name (``<case>_<task>.nii.gz``, as predict writes), if
    one is."""
    found = set()
    for pair in pairs:
        name = case_name(pair.pred)
        found.add(name[len(pair.case) + 1:] if name.startswith(pair.case + "_") else None)
    task = found.pop() if len(found) == 1 else None
    return task if task in (*table.names(), "all") else None


def _read(path: str) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    try:
        image = nib.load(path)
    except Exception as e:  # nibabel raises several types for a file it cannot read
        raise InputError(f"cannot read {path} as NIfTI ({type(e).__name__}: {e})") from None
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path} has shape {data.shape}; a label map is 3-D")
    return data, image.affine, tuple(float(z) for z in image.header.get_zooms()[:3])


def evaluate(predictions: str | os.PathLike, labels: str | os.PathLike | None = None, *, task: str | None = None,
             out_dir: str | os.PathLike = "uniseg-evaluation", dice_empty: str = "exclude", hd95: bool = True,
             nsd: bool = True, nsd_tolerance: float = 2.0, overwrite: bool = False, progress: bool = True,
             model: str | os.PathLike | None = None) -> dict:
    """Score label maps against references and write the report into ``out_dir`` (``write_report``).

    ``predictions``: a folder of label maps (with ``labels``, a folder of references) or a datalist JSON of
    ``{"pred", "label"}`` items. ``task``: whose label names the report uses (default: the task in the
    predictions' names, else ``label N``), one of ``model``'s tasks (``pretrained.model_tasks``: a model with
    added tasks names their labels) or of the official eleven. Returns the report (``write_report``'s dict).
    """
    from tqdm import tqdm

    from ..pretrained import model_tasks
    from ..training.evaluation import dice_metric, score_case, write_report

    dice_metric(dice_empty)  # an unknown rule is refused before anything is read
    if float(nsd_tolerance) <= 0:
        raise InputError(f"--nsd-tolerance must be a positive distance in mm, got {nsd_tolerance}")
    source = Path(predictions)
    if source.is_file():
        if labels is not None:
            raise InputError(f"{source} is a datalist (it names the labels): give no LABELS folder with it")
        pairs = pairs_from_datalist(source)
    elif labels is None:
        raise InputError(f"{source} is not a datalist file; to score a predictions folder, give the labels folder "
                         "too: uniseg-hub evaluate PREDICTIONS LABELS")
    else:
        pairs = pairs_from_folders(source, labels, task)
    table = OFFICIAL_TASKS if model is None else model_tasks(model)
    task = task or guess_task(pairs, table)
    out = Path(out_dir)
    if (out / "report.json").exists() and not overwrite:
        raise InputError(f"{out} already holds a report (report.json); give --overwrite to replace it or choose "
                         "another --out")
    names = table.get(task).label_names if task and task != "all" else None
    if names is None:  # the label values that occur name the labels: a first pass reads them
        values = set()
        for pair in tqdm(pairs, desc="reading labels", unit="case", disable=not progress):
            for path in (pair.pred, pair.label):
                values.update(int(v) for v in np.unique(_read(path)[0]) if v > 0)
        if task == "all":  # the all-tasks map: the merged labels that occur, by their "task: label" names
            merged = table.merged_label_names()
            names = {v: merged.get(v, f"label {v}") for v in sorted(values)}
        else:
            logger.warning("no task given or found in the predictions' names: labels are named by value; give "
                           "--task for the task's label names")
            names = {v: f"label {v}" for v in sorted(values)}
    rows, unnamed = [], set()
    for pair in tqdm(pairs, desc="scoring", unit="case", disable=not progress):
        pred, pred_affine, _ = _read(pair.pred)
        label, affine, spacing = _read(pair.label)
        if pred.shape != label.shape or not np.allclose(pred_affine, affine, atol=1e-3):
            raise InputError(f"{pair.case}: the prediction {pair.pred} ({pred.shape}) and the label {pair.label} "
                             f"({label.shape}) are not on one grid; score predictions written on the scan's grid "
                             "(as uniseg-hub predict writes them)")
        unnamed.update(int(v) for v in np.union1d(np.unique(pred), np.unique(label)) if v > 0 and v not in names)
        rows.extend(score_case(pair.case, pred, label, names, spacing, task=task or "", dice_empty=dice_empty,
                               hd95=hd95, nsd=nsd, nsd_tolerance=nsd_tolerance))
    if unnamed:
        logger.warning("label value(s) %s are not labels of %s and are not scored", sorted(unnamed), task)
    settings = {"dice_empty": dice_empty, "hd95": hd95, "nsd": nsd, "nsd_tolerance": float(nsd_tolerance),
                "dice": "MONAI DiceMetric", "hd95_metric": "MONAI HausdorffDistanceMetric(95)",
                "nsd_metric": "MONAI SurfaceDiceMetric", "predictions": str(source),
                "labels": None if labels is None else str(labels)}
    return write_report(rows, out, names, task=task or "", settings=settings)
