"""Scoring segmentations: per case and per label (by name), Dice, HD95 and normalised surface Dice, with MONAI.

One report for every way of evaluating: ``score_case`` scores a case, ``write_report`` writes the report (JSON,
CSV per case and label, summary CSV with mean and standard deviation, box plot PNG). ``uniseg-hub evaluate``
(``app.evaluate``), the bundle's ``evaluate.json`` and train.json's ``run evaluate`` (both through the
``SegmentationReport`` handler) all use them.

Dice rule: by default the downstream protocol's (nnU-Net v1's evaluator): a label absent from both prediction and
reference is NaN and left out of the means (``AbsentClassDiceMetric``); ``dice_empty="one"`` counts it 1.0 as
UniSeg's upstream ``UniSeg_Metrics_test.py`` does, ``"monai"`` is MONAI's default. Labels are scored separately
(no region merging); means are over cases per label, then over labels.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.metrics import DiceMetric
from monai.networks import one_hot
from monai.utils import MetricReduction

from ..errors import TrainingError, UnisegHubError
from ..files import atomic_path, write_text_atomic
from ..pipeline.cases import output_case_name

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


def _case_name(item: Mapping) -> str:
    """The case an evaluated item comes from (``pipeline.cases.output_case_name`` of its first input file)."""
    meta = getattr(item.get("image"), "meta", None) or getattr(item.get("pred"), "meta", {})
    name = meta.get("filename_or_obj", "case")
    return output_case_name(name[0] if isinstance(name, (list, tuple)) else str(name))


def _json_number(x: float):
    return None if x is None or math.isnan(x) or math.isinf(x) else round(float(x), 6)


METRICS = ("dice", "hd95", "nsd")
"""What the report gives per case and label: Dice, 95th-percentile Hausdorff distance (mm), normalised surface Dice."""

NSD_TOLERANCE = 2.0
"""Default tolerance (mm) of the normalised surface Dice: surface points this close to the other surface count."""


def _label_map(t) -> torch.Tensor:
    """(x, y, z) class indices from a label map ((x, y, z) or (1, x, y, z)) or one-hot / probabilities (C, x, y, z)."""
    t = torch.as_tensor(t).detach().cpu()
    if t.ndim == 4:
        t = t.argmax(0) if t.shape[0] > 1 else t[0]
    return (t.round() if t.is_floating_point() else t).long()


def score_case(case: str, pred, label, label_names: Mapping[int, str], spacing=(1.0, 1.0, 1.0), *,
               task: str = "", dice_empty: str = "exclude", hd95: bool = True, nsd: bool = True,
               nsd_tolerance: float = NSD_TOLERANCE) -> list[dict]:
    """One row per foreground label of ``label_names``: Dice, HD95 (mm) and NSD of ``pred`` against ``label``.

    MONAI's metrics on one-hot maps: Dice by ``dice_metric(dice_empty)`` (default ``exclude``, the official
    downstream rule: a label absent from both is NaN, left out of the means; ``one`` counts it 1.0);
    ``HausdorffDistanceMetric(percentile=95)`` and ``SurfaceDiceMetric`` (tolerance ``nsd_tolerance`` mm) with the
    voxel ``spacing``. HD95 is NaN when either mask is empty; NSD is NaN when both are, 0 when one is.
    ``pred`` and ``label``: label maps (x, y, z) or (1, x, y, z), or one-hot (C, x, y, z), on the same grid.
    """
    from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric

    pred, label = _label_map(pred), _label_map(label)
    if pred.shape != label.shape:
        raise UnisegHubError(f"{case}: the reference label has shape {tuple(label.shape)} but the prediction "
                             f"{tuple(pred.shape)}; labels must be on the image's grid")
    values = [int(v) for v in label_names if int(v) != 0]
    classes = max([*values, int(pred.max()), int(label.max()), 0]) + 1
    p = one_hot(pred[None, None], classes, dim=1)
    g = one_hot(label[None, None], classes, dim=1)
    spacing = [float(s) for s in spacing][:3]
    dice = dice_metric(dice_empty, include_background=True)(p, g)[0]
    present = (p.flatten(2).sum(-1) > 0)[0], (g.flatten(2).sum(-1) > 0)[0]
    with warnings.catch_warnings():  # MONAI warns about every empty class; the rule for them is documented above
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95)(p, g, spacing=spacing)[0] \
            if hd95 else None
        sd = SurfaceDiceMetric([float(nsd_tolerance)] * classes, include_background=True)(p, g, spacing=spacing)[0] \
            if nsd else None
    rows = []
    for v in values:
        both = bool(present[0][v] and present[1][v])
        rows.append({"case": case, "task": task, "label": v, "name": label_names[v], "dice": float(dice[v]),
                     "hd95": float(hd[v]) if hd is not None and both else math.nan,
                     "nsd": float(sd[v]) if sd is not None else math.nan})
    return rows


def _stats(values: list[float]) -> dict:
    """Mean and (population) standard deviation over the defined values, and how many there were."""
    defined = [v for v in values if not (math.isnan(v) or math.isinf(v))]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(defined) / len(defined)
    std = math.sqrt(sum((v - mean) ** 2 for v in defined) / len(defined))
    return {"mean": _json_number(mean), "std": _json_number(std), "n": len(defined)}


def summarize(rows: list[dict], label_names: Mapping[int, str]) -> dict:
    """Per label (by name) and metric: mean, standard deviation and number of cases where it is defined; and per
    metric the mean over labels of those means (nnU-Net's summary; a label defined in no case is left out)."""
    names = {int(v): n for v, n in label_names.items() if int(v) != 0}
    labels = {}
    for value, name in names.items():
        mine = [r for r in rows if r["label"] == value]
        labels[name] = {"label": value, **{m: _stats([r[m] for r in mine]) for m in METRICS}}
    mean = {}
    for m in METRICS:
        means = [s[m]["mean"] for s in labels.values() if s[m]["mean"] is not None]
        mean[m] = _json_number(sum(means) / len(means)) if means else None
    return {"cases": len({r["case"] for r in rows}), "labels": labels, "mean": mean}


REPORT_FILES = {"json": "{prefix}.json", "csv": "{prefix}.csv", "summary_csv": "{prefix}_summary.csv",
                "boxplot": "{prefix}_boxplot.png"}
"""The files ``write_report`` writes into its folder."""


def _cell(x: float, digits: int) -> str:
    return "" if math.isnan(x) or math.isinf(x) else f"{x:.{digits}f}"


def write_report(rows: list[dict], output_dir: str | Path, label_names: Mapping[int, str], *, task: str = "",
                 prefix: str = "report", settings: Mapping | None = None, plot: bool = True) -> dict:
    """The evaluation report, the same for ``uniseg-hub evaluate``, ``evaluate.json`` and train.json's ``evaluate``.

    ``rows``: ``score_case`` rows of all cases. Writes (atomically) into ``output_dir``:

    * ``<prefix>.json``: settings, per label and metric mean / std / n, the means over labels, and every row;
    * ``<prefix>.csv``: one row per case and label (case, task, label, name, dice, hd95, nsd; empty = undefined);
    * ``<prefix>_summary.csv``: one row per label and metric (mean, std, n) and the means over labels (``all``);
    * ``<prefix>_boxplot.png``: a box plot per metric, one box per label (``plot``).

    Returns the JSON report, with ``files`` (what was written).
    """
    out = Path(output_dir)
    files = {k: out / v.format(prefix=prefix) for k, v in REPORT_FILES.items() if plot or k != "boxplot"}
    report = {"task": task, **summarize(rows, label_names), "settings": dict(settings or {}),
              "rows": [{**r, **{m: _json_number(r[m]) for m in METRICS}} for r in rows]}
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["case", "task", "label", "name", *METRICS], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({**{k: r[k] for k in ("case", "task", "label", "name")}, "dice": _cell(r["dice"], 6),
                         "hd95": _cell(r["hd95"], 4), "nsd": _cell(r["nsd"], 6)})
    write_text_atomic(files["csv"], text.getvalue())
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["label", "name", "metric", "mean", "std", "n"])
    for name, stats in report["labels"].items():
        for m in METRICS:
            s = stats[m]
            writer.writerow([stats["label"], name, m, "" if s["mean"] is None else s["mean"],
                             "" if s["std"] is None else s["std"], s["n"]])
    for m in METRICS:
        writer.writerow(["", "all", m, "" if report["mean"][m] is None else report["mean"][m], "", ""])
    write_text_atomic(files["summary_csv"], text.getvalue())
    if plot:
        with atomic_path(files["boxplot"], suffix=".png") as tmp:
            _boxplot(rows, label_names, tmp, title=f"{task}: {report['cases']} case(s)" if task else "")
    report["files"] = {k: str(v) for k, v in files.items()}
    write_text_atomic(files["json"], json.dumps(report, indent=2) + "\n")
    return report


METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 (mm)", "nsd": "normalised surface Dice"}


def _boxplot(rows: list[dict], label_names: Mapping[int, str], path: str, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = {int(v): n for v, n in label_names.items() if int(v) != 0}
    fig = Figure(figsize=(4 + 1.2 * len(METRICS) * max(1, len(names)) ** 0.5 * 2, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for ax, m in zip(fig.subplots(1, len(METRICS), squeeze=False)[0], METRICS):
        data = [[r[m] for r in rows if r["label"] == v and not (math.isnan(r[m]) or math.isinf(r[m]))]
                for v in names]
        shown = [i for i, d in enumerate(data) if d]
        if shown:
            ax.boxplot([data[i] for i in shown], tick_labels=[list(names.values())[i] for i in shown])
        else:
            ax.text(0.5, 0.5, "undefined in every case", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(METRIC_TITLES[m])
        ax.tick_params(axis="x", labelrotation=45)
        if m != "hd95":
            ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")


class SegmentationReport:
    """Ignite handler: score every case of an evaluator run (``score_case``) and write the report at the end
    (``write_report``: ``<prefix>.json``, ``.csv``, ``_summary.csv``, ``_boxplot.png``).

    Args:
        output_dir: where the report goes.
        label_names: label value -> name, or a list of names from 0 (background included or not; 0 is never
            scored).
        task: task name written in each row (``"all"`` for the all-tasks mode).
        hd95: compute HD95 (slower on large volumes); nsd: compute the normalised surface Dice.
        dice_empty: what a label absent from both counts (``dice_metric``; default ``exclude``: left out).
        nsd_tolerance: the NSD tolerance in mm.
        prefix: file name prefix; settings: recorded in the JSON (which checkpoint, TTA, ...).

    The evaluator's postprocessing must leave ``pred`` and ``label`` on the same grid (label maps or one-hot). Under
    ``torchrun`` each rank scores its own cases; their rows are gathered and rank 0 writes the report.
    """

    def __init__(self, output_dir: str, label_names: Mapping[int, str], task: str = "", hd95: bool = True,
                 nsd: bool = True, dice_empty: str = "exclude", nsd_tolerance: float = NSD_TOLERANCE,
                 prefix: str = "report", settings: Mapping | None = None, pred_key: str = "pred",
                 label_key: str = "label"):
        self.output_dir = Path(output_dir)
        if not isinstance(label_names, Mapping):  # a list of names, background first (train.json's label_names)
            label_names = dict(enumerate(label_names))
        self.label_names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        self.task = task
        self.options = {"dice_empty": dice_empty, "hd95": bool(hd95), "nsd": bool(nsd),
                        "nsd_tolerance": float(nsd_tolerance)}
        dice_metric(dice_empty)  # an unknown rule fails now, not after the first case
        self.prefix = prefix
        self.settings = settings
        self.pred_key = pred_key
        self.label_key = label_key
        self.rows: list[dict] = []
        self.report: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def score(self, case: str, pred: torch.Tensor, label: torch.Tensor, spacing) -> list[dict]:
        """Rows for one case (``score_case`` with this report's options)."""
        return score_case(case, pred, label, self.label_names, spacing, task=self.task, **self.options)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine.state.output:
            label = item[self.label_key]
            spacing = getattr(label, "pixdim", None)
            spacing = [1.0, 1.0, 1.0] if spacing is None else spacing[:3].tolist()
            self.rows.extend(self.score(_case_name(item), item[self.pred_key], label, spacing))

    def _all_rows(self) -> list[dict]:
        """Every rank's rows under ``torchrun`` (each rank scores its shard of the cases), in case order."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.rows
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.rows)
        return sorted((r for rows in gathered for r in rows), key=lambda r: (r["case"], r["label"]))

    def completed(self, engine: Engine) -> None:
        from .distributed import is_main_process

        self.rows = self._all_rows()
        settings = {**self.options, "dice": "MONAI DiceMetric", "hd95_metric": "MONAI HausdorffDistanceMetric(95)",
                    "nsd_metric": "MONAI SurfaceDiceMetric", **dict(self.settings or {})}
        if is_main_process():
            self.report = write_report(self.rows, self.output_dir, self.label_names, task=self.task,
                                       prefix=self.prefix, settings=settings)
        else:
            self.report = {"task": self.task, **summarize(self.rows, self.label_names)}
        engine.state.metrics["report_mean_dice"] = self.report["mean"]["dice"]
