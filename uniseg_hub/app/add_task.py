"""``uniseg-hub add-task``: the bundle's ``train.json`` + ``add_task.json`` run with the command's options as
overrides (MONAI's ``ConfigWorkflow``), so the command and ``python -m monai.bundle run`` share one pipeline."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..config import choice
from ..errors import TrainingError
from ..tasks import GROUPS, modality_group
from ..training.add_task import MODES, REPORT_FILE
from .bundle import bundle_dir
from .predict import quiet, unwrap_error

CONFIGS = ("train.json", "add_task.json")


def _names(value, what: str) -> list[str] | None:
    """A comma-separated string (as the command line gives it) or a list, as a list of names."""
    if value is None:
        return None
    names = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    if not names or not all(names):
        raise TrainingError(f"--{what} takes comma-separated names, e.g. liver,tumour; got {value!r}")
    return names


def _spacing(value, datalist: Path) -> list[float]:
    """The task's training spacing: three numbers in mm, or the target spacing ``prepare`` stored in the datalist."""
    if value is None:
        properties = json.loads(datalist.read_text()).get("properties") or {}
        if "target_spacing" not in properties:
            raise TrainingError(f"give the task's training spacing with --spacing X,Y,Z (mm); {datalist} stores no "
                                "target spacing (`uniseg-hub prepare` writes one)")
        value = properties["target_spacing"]
    try:
        spacing = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        spacing = []
    if len(spacing) != 3 or not all(0 < v < 100 for v in spacing):
        raise TrainingError(f"--spacing takes three voxel sizes in mm (x,y,z), e.g. 1.5,1.5,3; got {value!r}")
    return spacing


def add_task(model: str | os.PathLike, name: str, datalist: str | os.PathLike, out: str | os.PathLike, *,
             labels: str | Sequence[str] | None = None, modality: str | None = None,
             channels: str | Sequence[str] | None = None, spacing=None, normalization: str | None = None,
             mode: str = "frozen", epochs: int | None = None, iterations: int | None = None,
             batch_size: int | None = None, init_from: str | None = None, check: str | os.PathLike | None = None,
             title: str | None = None, device: str | None = None, workers: int | None = None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Add task ``name`` to the universal ``model`` from the labelled cases of ``datalist`` and write the grown
    model to ``out``; returns the report (also ``out/add_task_report.json``).

    ``labels`` (foreground names), ``channels`` (input channel names) and ``spacing`` default to the datalist's
    ``labels``, ``modality`` and ``properties.target_spacing``; ``modality`` is the task's group (CT, MR, PET-CT),
    by default read from the channels. ``epochs`` x ``iterations`` (per epoch) default to train.json's. ``check``:
    a datalist whose ``validation`` cases name the ``task`` they belong to, scored before and after (each old task's
    Dice movement); the datalist's own ``validation`` cases score the new task. The run (checkpoints, logs) lives in
    ``out/training``; ``resume`` continues it.
    """
    datalist = Path(datalist)
    if not datalist.is_file():
        raise TrainingError(f"datalist {datalist} does not exist; give a JSON datalist with a 'training' list of "
                            "{'image': ..., 'label': ...} (the format `uniseg-hub prepare` writes)")
    mode = choice(mode, "mode", tuple(MODES))
    settings = {"pretrained": str(model), "task_name": name, "datalist_file": str(datalist),
                "dataset_dir": str(datalist.parent), "model_dir": str(out), "mode": mode,
                "spacing": _spacing(spacing, datalist), "resume": resume, "overwrite": overwrite,
                "progress": progress, "init_from": init_from, "task_title": title,
                "check_datalist": str(check) if check else None}
    if labels is not None:
        settings["label_names"] = ["background", *_names(labels, "labels")]
    if modality is not None:
        group = modality_group(modality)
        if group is None:
            raise TrainingError(f"--modality must be one of {', '.join(GROUPS)} (the task's modality group), got "
                                f"{modality!r}; name the input channels with --channels")
        settings["task_group"] = group
    names = _names(channels, "channels")
    if names is None and modality is not None and "modality" not in json.loads(datalist.read_text()):
        names = ["CT", "PET"] if settings["task_group"] == "PET-CT" else [settings["task_group"]]
    if names is not None:
        settings["modality"] = names
    optional = {"normalization": normalization, "epochs": epochs, "iterations_per_epoch": iterations,
                "batch_size": batch_size, "num_workers": workers}
    settings.update({k: v for k, v in optional.items() if v is not None})
    if device is not None:
        import torch

        settings["device"] = torch.device(device)
    root = bundle_dir()
    quiet()
    from monai.bundle import ConfigWorkflow

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workflow = ConfigWorkflow(config_file=[str(root / "configs" / c) for c in CONFIGS],
                                      meta_file=str(root / "configs" / "metadata.json"), logging_file=False,
                                      workflow_type="train", bundle_root=str(root), **settings)
            workflow.initialize()
            workflow.run()
            workflow.finalize()
    except RuntimeError as e:
        if (cause := unwrap_error(e)) is None:
            raise
        raise cause from None
    return json.loads((Path(out) / REPORT_FILE).read_text())
