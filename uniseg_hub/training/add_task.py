"""Adding a user's task to the universal model (``uniseg-hub add-task``, the bundle's ``configs/add_task.json``).

``grow_network`` builds the universal model with one more task (``networks.AddedTask``: its own prompt channel over
the shared fusion's hidden features, zero residual adapters, own heads), copies every trained tensor and starts the
new task as a copy of a source task, so step 0 reproduces that task. train.json's loss, augmentation, trainer and
checkpoints then train it: ``mode="frozen"`` (default) trains only the new task's modules, so the original tasks'
logits stay bit-identical; ``"finetune"`` also trains the decoder's upsampling and conv blocks (the shared heads,
encoder and prompt stay fixed), and ``task_dice`` measures how far each old task moved on cases the user supplies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged
from torch import nn

from ..config import WEIGHTS_FILE, parse_bool
from ..errors import TrainingError, UnknownTaskError
from ..pipeline import ArgMaxd, InvertToInputd, NnUNetSlidingWindowInferer, NormalizeTaskd, ResampleToSpacingd
from ..pretrained import UniSeg, load_model
from ..tasks import Task
from ..weights import load_checked, save_folder
from .data import load_datalist
from .distributed import is_main_process, log_main, unwrap

MODES = {"frozen": ("added.{n}.",), "finetune": ("added.{n}.", "decoder.upsamples.", "decoder.blocks.")}
"""The parameters each mode trains (name prefixes; ``{n}`` is the added task's index); everything else is frozen."""

REPORT_FILE = "add_task_report.json"


def task_group(channels: Sequence[str]) -> str:
    """The modality group of a task's channels: CT alone, PET-CT with a PET channel, else MR."""
    names = [str(c).upper() for c in channels]
    if all(n == "CT" for n in names):
        return "CT"
    return "PET-CT" if "PET" in names else "MR"


def default_normalization(channels: Sequence[str]) -> list[str]:
    """The official scheme per channel: the CT window for CT, a per-image z-score for everything else."""
    return ["ct_window" if str(c).upper() == "CT" else "zscore" for c in channels]


def source_task(model: UniSeg, new: Task, init_from: int | str | None = None) -> Task:
    """The prompted task the new one starts from: ``init_from``, or the first of the same group with as many
    channels, else the first with as many channels, else task 0."""
    table = model.tasks
    if init_from not in (None, ""):
        task = table.get(init_from)
        if task.id >= model.prompted_tasks:
            raise UnknownTaskError(f"init_from {task.name!r} is an added task; start from one of the prompted tasks: "
                                   + ", ".join(t.name for t in table if t.id < model.prompted_tasks))
        return task
    prompted = [t for t in table if t.id < model.prompted_tasks]
    for fits in (lambda t: t.group == new.group and t.num_channels == new.num_channels,
                 lambda t: t.num_channels == new.num_channels):
        found = [t for t in prompted if fits(t)]
        if found:
            return found[0]
    return prompted[0]


@torch.no_grad()
def initialise_added_task(model: UniSeg, index: int, source: int) -> None:
    """Start added task ``index`` as prompted task ``source``: its prompt block is the fusion's last block's row
    (conv and norm) for ``source``, its heads the shared heads' first rows (the rest keep their fresh
    initialisation when it has more classes than the shared head); adapters stay zero. Instance norm is per
    channel, so the new task's logits are then the source task's first C channels."""
    added, fusion = model.added[index].prompt, model.prompt.fusion[-1]
    added.conv.weight.copy_(fusion.conv.weight[source: source + 1])
    added.conv.bias.copy_(fusion.conv.bias[source: source + 1])
    added.adn.N.weight.copy_(fusion.adn.N.weight[source: source + 1])
    added.adn.N.bias.copy_(fusion.adn.N.bias[source: source + 1])
    for own, shared in zip(model.added[index].heads, model.decoder.heads):
        rows = min(own.out_channels, shared.out_channels)
        own.weight[:rows].copy_(shared.weight[:rows])


def trainable(network: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets: those that require a gradient."""
    return [p for p in network.parameters() if p.requires_grad]


def grow_network(pretrained: str | os.PathLike, task_name: str, labels: Sequence[str], channels: Sequence[str],
                 spacing: Sequence[float], normalization: Sequence[str] | str | None = None, group: str | None = None,
                 init_from: int | str | None = None, mode: str = "frozen", title: str | None = None,
                 dataset: str = "user dataset") -> UniSeg:
    """The universal model ``pretrained`` with task ``task_name`` added, in training mode, ready for train.json.

    ``labels``: the foreground names (a leading ``background`` is dropped, so train.json's ``label_names`` fits);
    ``channels``: the input channels' names (``["CT"]``, ``["T2"]``); ``normalization``: one scheme per channel
    or one for all (default the official one per channel); ``group`` defaults to ``task_group(channels)``.
    Every original tensor is loaded strictly; only ``added.N.*`` is new. ``network(x)`` runs the new task (it is
    the default task), and only the parameters of ``mode`` (``MODES``) require a gradient.
    """
    if mode not in MODES:
        raise TrainingError(f"unknown add-task mode {mode!r}; choose one of {', '.join(MODES)}")
    if not task_name:
        raise TrainingError("name the task to add (--task_name, e.g. knee_cartilage)")
    labels = [str(v) for v in labels]
    if labels and labels[0] == "background":
        labels = labels[1:]
    channels = [str(c) for c in channels]
    if isinstance(normalization, str):
        normalization = [normalization] * len(channels)
    normalization = list(normalization or default_normalization(channels))
    base = load_model(pretrained)
    if not isinstance(base, UniSeg) or base.tasks is None:
        raise TrainingError(f"{pretrained} is not a universal UniSeg model with a task table; add-task extends the "
                            "universal model (e.g. uniseg-11task), not a fine-tuned backbone")
    if len(channels) not in base.config.in_channels:
        raise TrainingError(f"the task has {len(channels)} channels ({', '.join(channels)}) but {pretrained} has "
                            f"stems for {list(base.config.in_channels)} channels only")
    table = base.tasks.with_task(task_name, labels=labels, channels=channels, normalization=normalization,
                                 spacing=[float(v) for v in spacing], group=group or task_group(channels),
                                 title=title, dataset=dataset)
    new = table[len(table) - 1]
    source = source_task(base, new, init_from)
    model = UniSeg(base.config.with_added_task(new.num_classes), tasks=table)
    index = len(model.added) - 1
    report = load_checked(model, base.state_dict(), may_initialise=[f"added.{index}.*"], source=str(pretrained))
    initialise_added_task(model, index, source.id)
    model.default_task = new.id
    prefixes = tuple(p.format(n=index) for p in MODES[mode])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(prefixes))
    model.load_report, model.source_task = report, source
    model.train()
    log_main(f"add-task {new.name!r} (id {new.id}, {new.num_classes} classes) to {pretrained}, started from "
             f"{source.name!r}, mode {mode}: {sum(p.numel() for p in trainable(model)):,} parameters train; "
             f"{report.summary()}")
    return model


def check_cases(datalist_file: str | os.PathLike | None, key: str = "validation",
                base_dir: str | os.PathLike | None = None, task: str | None = None) -> list[dict]:
    """Labelled cases to score tasks on: the ``key`` list of a datalist (none when it has no such list or no
    datalist is given), each entry naming its ``task`` or taken as ``task``'s. Paths are resolved against
    ``base_dir`` (default the datalist's folder) and checked."""
    if not datalist_file:
        return []
    if not json.loads(Path(datalist_file).read_text()).get(key):
        return []
    cases = load_datalist(datalist_file, key, base_dir)
    for case in cases:
        case.setdefault("task", task)
        if not case["task"]:
            raise TrainingError(f"a '{key}' entry of {datalist_file} names no 'task' to score it with: {case}")
    return cases


def check_model_dir(model_dir: str | os.PathLike, overwrite=False, resume=False) -> None:
    """Refuse, before training, a ``model_dir`` that already holds a model, unless it is to be replaced."""
    weights = Path(model_dir) / WEIGHTS_FILE
    if weights.exists() and not (parse_bool(overwrite) or parse_bool(resume)):
        raise TrainingError(f"{weights} already exists; choose another output folder, or pass --overwrite true "
                            "(or --resume true to continue its run)")


@torch.no_grad()
def task_dice(network: nn.Module, cases: Sequence[Mapping], patch_size: Sequence[int] | None = None,
              device: str | torch.device = "cpu", sw_batch_size: int = 2) -> dict[str, dict]:
    """Each task's mean Dice on ``cases`` (``check_cases``): per class over the cases where it is defined, then
    over classes (nnU-Net's summary). Each case goes the bundle's way with the pieces its configs use: the task's
    official resampling and normalisation, nnU-Net's sliding window (no mirroring: a before/after measure), the
    probabilities back on the input grid, scored there against the label with MONAI's ``compute_dice`` (per case:
    ``DiceMetric``'s buffer would gather across ranks while the others train). Scored on rank 0 (other ranks
    return ``{}``)."""
    if not is_main_process():
        return {}
    model = unwrap(network)
    was_training = model.training
    model.eval()
    inferer = NnUNetSlidingWindowInferer(tuple(patch_size or model.patch_size), sw_batch_size)
    read = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                    EnsureTyped("image", dtype=torch.float32)])
    scores: dict[str, list[torch.Tensor]] = {}
    try:
        for case in cases:
            task = model.tasks.get(case["task"])
            prepare = Compose([ResampleToSpacingd("image", task.spacing), NormalizeTaskd("image", task)])
            item = prepare(read({"image": case["image"], "label": case["label"]}))
            logits = inferer(item["image"][None].to(device), lambda x, t=task.id: model(x, t))[0]
            item["pred"] = torch.softmax(logits.float(), 0)[: task.num_classes].cpu()
            pred = ArgMaxd("pred")(InvertToInputd("pred", prepare, "image")(item))["pred"]
            onehot = [one_hot(torch.as_tensor(m)[None].round().long(), task.num_classes) for m in (pred, item["label"])]
            dice = compute_dice(*onehot, include_background=False, ignore_empty=False)[0].double()
            absent = ~(onehot[0][0, 1:].flatten(1).any(1) | onehot[1][0, 1:].flatten(1).any(1))
            scores.setdefault(task.name, []).append(torch.where(absent, torch.nan, dice))
    finally:
        model.train(was_training)
    return {name: {"dice": float(torch.nanmean(torch.nanmean(torch.stack(values), 0))), "cases": len(values)}
            for name, values in scores.items()}


def movement(before: Mapping[str, Mapping], after: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per task: Dice before (None when not scored), after and the change."""
    out = {}
    for name, scored in after.items():
        start = before[name]["dice"] if name in before else None
        out[name] = {"before": start, "after": scored["dice"], "cases": scored["cases"],
                     "change": None if start is None else scored["dice"] - start}
    return out


def save_added_task(network: nn.Module, model_dir: str | os.PathLike, *, pretrained: str | os.PathLike, mode: str,
                    trainer, datalist_file: str | os.PathLike, before: Mapping | None = None,
                    cases: Sequence[Mapping] = (), patch_size: Sequence[int] | None = None,
                    device: str | torch.device = "cpu") -> dict:
    """After training: write the grown model to ``model_dir`` (``model.safetensors`` + ``config.json`` with the
    extended task table and the provenance; replaced: ``check_model_dir`` guarded it before training) and
    ``add_task_report.json`` beside it; returns the report.

    ``before``: ``task_dice`` of the start model on ``cases`` (new task and old tasks), scored again here to
    report each task's Dice before and after. Rank 0 writes and scores; other ranks return ``{}``.
    """
    if not is_main_process():
        return {}
    model = unwrap(network)
    task = model.tasks[model.default_task]
    source = {"base_model": str(pretrained), "added_task": task.name, "added_task_id": task.id, "mode": mode,
              "init_from": model.source_task.name, "iterations": trainer.state.iteration,
              "epochs": trainer.state.epoch, "datalist": str(datalist_file)}
    out = save_folder(model_dir, model.state_dict(), model.config, source=source, tasks=model.tasks,
                      overwrite=True)
    losses = (getattr(trainer.state, "history", None) or {}).get("loss") or []
    report = {"model": str(out), "task": {"name": task.name, "id": task.id, "labels": list(task.labels),
                                           "channels": list(task.channels), "spacing": list(task.spacing),
                                           "normalization": list(task.normalization), "group": task.group},
              **source, "trained_parameters": sum(p.numel() for p in trainable(model)),
              "loss": {"first_epoch": losses[0] if losses else None, "last_epoch": losses[-1] if losses else None}}
    if cases:
        report["dice"] = movement(before or {}, task_dice(model, cases, patch_size, device))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    log_main(f"added task {task.name!r} -> {out}" + "".join(
        f"\n  {name:<20} Dice {d['before']} -> {d['after']:.4f} ({d['cases']} case(s))"
        for name, d in report.get("dice", {}).items()))
    return report
