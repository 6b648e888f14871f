"""Scoring as the paper scores: per case and per label, Dice of ``pred == c`` against ``label == c``.

The official evaluation (``Upstream/UniSeg_Metrics_test.py``) scores every label separately (no region merging),
counts an empty prediction on an empty reference as Dice 1.0, and averages over cases per task and label. HD95 (in
millimetres, MONAI's ``compute_hausdorff_distance``) is reported too; it is undefined (null) when either mask is
empty. ``SegmentationReport`` is an ignite handler for the bundle's evaluator; it writes ``<prefix>.csv`` (one row
per case and label) and ``<prefix>_summary.json`` (means per label).

The downstream runs (fine-tuning, ``bundle/configs/train.json``) were scored by nnU-Net's own evaluator, which
leaves a class absent from both prediction and reference out of the mean (NaN, averaged with ``nanmean``):
``dice_metric`` gives that metric (``AbsentClassDiceMetric``), or MONAI's behaviours as options.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric, compute_dice, compute_hausdorff_distance
from monai.networks import one_hot
from monai.utils import MetricReduction

from ..errors import TrainingError, UnisegHubError
from ..files import write_text_atomic
from ..pipeline.cases import case_name


def dice_per_label(pred: torch.Tensor, label: torch.Tensor, labels: Mapping[int, str]) -> dict[int, float]:
    """Dice of each foreground label value; 1.0 when the label is absent from both."""
    out = {}
    for value in labels:
        if value == 0:
            continue
        p = (pred == value).float()[None, None]
        g = (label == value).float()[None, None]
        out[value] = float(compute_dice(p, g, include_background=True, ignore_empty=False))
    return out


DICE_EMPTY = ("exclude", "one", "monai")


class AbsentClassDiceMetric(DiceMetric):
    """MONAI's ``DiceMetric`` scoring empty classes as nnU-Net's evaluator does (the downstream protocol):

    * a class absent from both prediction and reference is NaN: left out of the means (nnU-Net v1
      ``evaluation/metrics.py`` ``dice(..., nan_for_nonexisting=True)``, averaged with ``nanmean``);
    * a class absent from the reference but predicted scores 0, one present in the reference as usual.

    ``aggregate()`` with the ``mean`` reduction is nnU-Net's summary: each class's mean over the cases where it is
    defined, then the mean over classes (a class defined in no case is left out). Other reductions are MONAI's.
    Inputs: one-hot (B, C, *spatial), or class indices (B, 1, *spatial) with ``num_classes``.
    """

    def __init__(self, include_background: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN,
                 num_classes: int | None = None, **kwargs):
        super().__init__(include_background=include_background, reduction=reduction, num_classes=num_classes,
                         ignore_empty=False, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dice = super()._compute_tensor(y_pred, y).float()
        channels = dice.shape[1]
        present = []
        for t in (y_pred, y):
            if t.shape[1] == 1 and self.num_classes and self.num_classes > 1:
                t = one_hot(t, self.num_classes, dim=1)
            present.append(t.reshape(t.shape[0], t.shape[1], -1).sum(-1) > 0)
        absent = ~(present[0] | present[1])
        absent = absent[:, absent.shape[1] - channels:]  # without background when it is not scored
        return dice.masked_fill(absent.to(dice.device), float("nan"))

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        if (reduction or self.reduction) != MetricReduction.MEAN:
            return super().aggregate(reduction)
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise TrainingError(f"nothing to aggregate: the Dice metric holds {type(data).__name__}")
        per_class = torch.nanmean(data.double(), dim=0)
        mean = torch.nanmean(per_class).to(data.dtype)
        if self.get_not_nans:
            return mean, (~torch.isnan(per_class)).sum().to(data.dtype)
        return mean


def dice_metric(empty: str = "exclude", include_background: bool = False, **kwargs) -> DiceMetric:
    """The Dice metric of fine-tuning validation and ``run evaluate``, by what a class empty in a case counts:

    * ``exclude`` (default, nnU-Net's evaluator, the downstream protocol): absent from both prediction and reference
      -> left out of the mean (``AbsentClassDiceMetric``);
    * ``one``: absent from both -> 1.0 (UniSeg's upstream ``UniSeg_Metrics_test.py``;
      ``DiceMetric(ignore_empty=False)``);
    * ``monai``: MONAI's default ``DiceMetric()`` (``ignore_empty=True``): absent from the reference -> left out,
      whatever the prediction.
    """
    if empty == "exclude":
        return AbsentClassDiceMetric(include_background=include_background, **kwargs)
    if empty == "one":
        return DiceMetric(include_background=include_background, ignore_empty=False, **kwargs)
    if empty == "monai":
        return DiceMetric(include_background=include_background, **kwargs)
    raise TrainingError(f"unknown dice_empty {empty!r}; choose one of {', '.join(DICE_EMPTY)}")


def hd95_per_label(pred: torch.Tensor, label: torch.Tensor, labels: Mapping[int, str], spacing) -> dict[int, float]:
    """95th-percentile Hausdorff distance in mm of each foreground label; NaN when either mask is empty."""
    out = {}
    for value in labels:
        if value == 0:
            continue
        p = pred == value
        g = label == value
        if not p.any() or not g.any():
            out[value] = math.nan
            continue
        distance = compute_hausdorff_distance(p.float()[None, None], g.float()[None, None], include_background=True,
                                              percentile=95, spacing=[float(s) for s in spacing])
        out[value] = float(distance)
    return out


def _case_name(item: Mapping) -> str:
    """The case an evaluated item comes from (``pipeline.cases.case_name`` of its first input file)."""
    meta = getattr(item.get("image"), "meta", None) or getattr(item.get("pred"), "meta", {})
    name = meta.get("filename_or_obj", "case")
    return case_name(name[0] if isinstance(name, (list, tuple)) else str(name))


def _json_number(x: float):
    return None if math.isnan(x) else round(x, 6)


class SegmentationReport:
    """Ignite handler: score every case of an evaluator run and write CSV + JSON reports at the end.

    Args:
        output_dir: where ``<prefix>.csv`` and ``<prefix>_summary.json`` go.
        label_names: label value -> name (background included or not; 0 is never scored).
        task: task name written in each row (``"all"`` for the all-tasks mode).
        hd95: also compute HD95 (slower on large volumes).
        prefix: file name prefix.

    The evaluator's postprocessing must leave ``pred`` (label map) and ``label`` (reference) on the same grid.
    """

    def __init__(self, output_dir: str, label_names: Mapping[int, str], task: str = "", hd95: bool = True,
                 prefix: str = "metrics", pred_key: str = "pred", label_key: str = "label"):
        self.output_dir = Path(output_dir)
        self.label_names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        self.task = task
        self.hd95 = hd95
        self.prefix = prefix
        self.pred_key = pred_key
        self.label_key = label_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def score(self, case: str, pred: torch.Tensor, label: torch.Tensor, spacing) -> list[dict]:
        """Rows for one case; ``pred`` and ``label`` are (1, x, y, z) or (x, y, z) label maps of equal shape."""
        pred, label = (torch.as_tensor(t)[0] if t.ndim == 4 else torch.as_tensor(t) for t in (pred, label))
        if pred.shape != label.shape:
            raise UnisegHubError(f"{case}: the reference label has shape {tuple(label.shape)} but the prediction "
                                 f"{tuple(pred.shape)}; labels must be on the image's grid")
        label = label.round().long()
        dice = dice_per_label(pred, label, self.label_names)
        hd = hd95_per_label(pred, label, self.label_names, spacing) if self.hd95 else {}
        return [{"case": case, "task": self.task, "label": v, "name": n, "dice": dice[v],
                 "hd95": hd.get(v, math.nan)} for v, n in self.label_names.items()]

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            label = item[self.label_key]
            spacing = getattr(label, "pixdim", None)
            spacing = [1.0, 1.0, 1.0] if spacing is None else spacing[:3].tolist()
            self.rows.extend(self.score(_case_name(item), item[self.pred_key], label, spacing))

    def summary(self) -> dict:
        """Mean Dice (and HD95 over defined values) per label, and their mean over labels."""
        per_label = {}
        for value, name in self.label_names.items():
            rows = [r for r in self.rows if r["label"] == value]
            hds = [r["hd95"] for r in rows if not math.isnan(r["hd95"])]
            per_label[name] = {
                "label": value,
                "dice": _json_number(sum(r["dice"] for r in rows) / len(rows)) if rows else None,
                "hd95": _json_number(sum(hds) / len(hds)) if hds else None,
                "cases": len(rows),
            }
        dices = [v["dice"] for v in per_label.values() if v["dice"] is not None]
        return {"task": self.task, "cases": len({r["case"] for r in self.rows}), "labels": per_label,
                "mean_dice": _json_number(sum(dices) / len(dices)) if dices else None}

    def completed(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["case", "task", "label", "name", "dice", "hd95"])
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "dice": f"{row['dice']:.6f}",
                             "hd95": "" if math.isnan(row["hd95"]) else f"{row['hd95']:.4f}"})
        write_text_atomic(self.output_dir / f"{self.prefix}.csv", text.getvalue())
        summary = self.summary()
        write_text_atomic(self.output_dir / f"{self.prefix}_summary.json", json.dumps(summary, indent=2) + "\n")
        engine.state.metrics["mean_dice"] = summary["mean_dice"]
