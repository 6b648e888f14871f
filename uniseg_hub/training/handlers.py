"""ignite/MONAI engine handlers of fine-tuning: clipping, freezing, progress, curves, checkpoints, metrics."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as IgniteProgressBar
from monai.engines import IterationEvents
from torch import nn

from ..config import parse_bool
from ..errors import ResumeError, TrainingError
from ..files import atomic_path, write_text_atomic
from ..weights import load_checked, read_folder, save_folder
from .distributed import all_mean, is_main_process, log_main, unwrap

STATE_FILE = "training_state.pt"


STATE_FORMAT = 1


def loss_of(output) -> float:
    """The loss of a trainer iteration's output, batched (a dict) or decollated (a list of dicts)."""
    item = output[0] if isinstance(output, (list, tuple)) else output
    loss = item["loss"]
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


class GradientClipping:
    """Clip the gradient norm after backward and before the optimizer step (nnU-Net: 12); with AMP the gradients
    are unscaled first, as the official trainer does, so the threshold applies to true gradients."""

    def __init__(self, max_norm: float = 12.0):
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        if getattr(engine, "accumulation_steps", 1) != 1:
            raise TrainingError("GradientClipping clips every step; it does not combine with accumulation_steps > 1")
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.amp and engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class FreezeEncoder:
    """Keep the encoder frozen (no gradient, no update, no weight decay) for the first ``epochs`` epochs.

    Needs ``optim_set_to_none`` on the trainer, so frozen parameters have no gradient for SGD to apply, and
    ``find_unused_parameters`` under DistributedDataParallel (multi_gpu_train.json sets it).
    """

    def __init__(self, network: nn.Module, epochs: int = 0):
        if epochs < 0:
            raise TrainingError(f"freeze_encoder_epochs must be 0 or more, got {epochs}")
        self.epochs = epochs
        self.params = [p for p in unwrap(network).encoder.parameters() if p.requires_grad]
        self.frozen: bool | None = None

    def attach(self, engine: Engine) -> None:
        if self.epochs:
            engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        frozen = engine.state.epoch <= self.epochs
        if frozen != self.frozen:
            for p in self.params:
                p.requires_grad_(not frozen)
            self.frozen = frozen
            log_main(f"epoch {engine.state.epoch}: encoder {'frozen' if frozen else 'unfrozen'}")


class ProgressBar(IgniteProgressBar):
    """ignite's tqdm progress bar showing the loss, attachable as a MONAI handler (``attach(engine)``)."""

    def __init__(self, persist: bool = True, **kwargs):
        super().__init__(persist=persist, **kwargs)

    def attach(self, engine: Engine, *args, **kwargs) -> None:
        super().attach(engine, output_transform=lambda output: {"loss": loss_of(output)})


def new_history() -> dict:
    """The per-epoch record ``TrainingLog`` keeps in ``trainer.state.history`` (saved with the last checkpoint)."""
    return {"epoch": [], "loss": [], "lr": [], "val_epoch": [], "val_metric": [], "metric": "", "val_per_label": {},
            "best_epoch": None}


class TrainingLog:
    """Per-epoch training loss (averaged over the epoch's iterations and all ranks), learning rate, validation
    metric, per-label validation Dice and the best epoch; rank 0 writes them to ``log_dir/history.json``, plots them
    to ``log_dir/training_curves.png`` (loss and learning rate; validation metric with the best epoch marked;
    validation Dice per label) and writes the per-label Dice to TensorBoard (``val_dice/<label>``, in ``log_dir``).

    The per-label values are the key metric's details (``save_details`` on the validator's key metric): each
    label's mean over the validation cases where it is defined; ``label_names`` names them (background first).

    The record lives in ``trainer.state.history``, so ``TrainingCheckpoint`` saves it and a resumed run continues
    the same curves. Attach it after the ``ValidationHandler``, so an epoch's files include its validation.
    """

    def __init__(self, log_dir: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                 validator: Engine | None = None, plot: bool = True, label_names=None, tensorboard: bool = True):
        self.log_dir = Path(log_dir)
        self.label_names = list(label_names.values() if isinstance(label_names, Mapping) else label_names or [])
        self.tensorboard = parse_bool(tensorboard)
        self._writer = None
        self.optimizer = optimizer
        self.validator = validator
        self.plot = parse_bool(plot)
        self.trainer: Engine | None = None
        self._sum, self._count, self._lr = 0.0, 0, None

    @property
    def history(self) -> dict:
        return self.trainer.state.history

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.state.history = new_history()
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    def _epoch_started(self, engine: Engine) -> None:
        self._sum, self._count = 0.0, 0
        self._lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None

    def _iteration_completed(self, engine: Engine) -> None:
        self._sum += loss_of(engine.state.output)
        self._count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        self.history["epoch"].append(engine.state.epoch)
        self.history["loss"].append(all_mean(self._sum, self._count, engine.state.device))
        self.history["lr"].append(self._lr)
        self.write()

    def _validated(self, evaluator: Engine) -> None:
        state = evaluator.state
        self.history["metric"] = state.key_metric_name or ""
        self.history["val_epoch"].append(state.epoch)
        self.history["val_metric"].append(float(state.metrics[self.history["metric"]]))
        self.history.setdefault("val_per_label", {})
        self.history["best_epoch"] = int(state.best_metric_epoch) if state.best_metric_epoch > 0 else None
        details = (getattr(state, "metric_details", None) or {}).get(self.history["metric"])
        if details is None:
            return
        values = torch.as_tensor(details, dtype=torch.float64).reshape(-1, torch.as_tensor(details).shape[-1])
        names = self.label_names[1:] if len(self.label_names) == values.shape[-1] + 1 else self.label_names
        for index in range(values.shape[-1]):
            name = names[index] if index < len(names) else f"class {index + 1}"
            mean = float(torch.nanmean(values[:, index]))
            per_label = self.history["val_per_label"].setdefault(name, {"epoch": [], "dice": []})
            per_label["epoch"].append(state.epoch)
            per_label["dice"].append(None if mean != mean else mean)
            if self.tensorboard and is_main_process() and mean == mean:
                self._tensorboard().add_scalar(f"val_dice/{name}", mean, state.epoch)
        if self._writer is not None:
            self._writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def write(self) -> None:
        if not is_main_process():
            return
        write_text_atomic(self.log_dir / "history.json", json.dumps(self.history, indent=1) + "\n")
        if self.plot:
            with atomic_path(self.log_dir / "training_curves.png", suffix=".png") as tmp:
                self._plot(tmp)

    def _plot(self, path: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        per_label = self.history.get("val_per_label") or {}
        fig = Figure(figsize=(15 if per_label else 10, 4), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3 if per_label else 2)
        ax_loss, ax_val = axes[0], axes[1]
        ax_loss.plot(self.history["epoch"], self.history["loss"], marker=".", label="training loss")
        ax_loss.set(xlabel="epoch", ylabel="Dice + CE loss (deep supervision)", title="training loss")
        if any(lr is not None for lr in self.history["lr"]):
            ax_lr = ax_loss.twinx()
            ax_lr.plot(self.history["epoch"], self.history["lr"], color="tab:gray", linestyle="--")
            ax_lr.set_ylabel("learning rate", color="tab:gray")
        ax_val.plot(self.history["val_epoch"], self.history["val_metric"], marker="o", color="tab:green")
        ax_val.set(xlabel="epoch", ylabel=self.history["metric"] or "metric", title="validation")
        best = self.history.get("best_epoch")
        if best in self.history["val_epoch"]:
            value = self.history["val_metric"][self.history["val_epoch"].index(best)]
            for ax in axes[1:]:
                ax.axvline(best, color="tab:red", linestyle=":", linewidth=1)
            ax_val.plot([best], [value], marker="*", markersize=14, color="tab:red", linestyle="none",
                        label=f"best: epoch {best} ({value:.3f})")
            ax_val.legend(loc="lower right", fontsize=8)
        if per_label:
            ax_labels = axes[2]
            for name, curve in per_label.items():
                ax_labels.plot(curve["epoch"], [float("nan") if v is None else v for v in curve["dice"]],
                               marker=".", label=name)
            ax_labels.set(xlabel="epoch", ylabel="Dice", title="validation Dice per label", ylim=(-0.02, 1.02))
            ax_labels.legend(fontsize=7, ncol=2 if len(per_label) > 8 else 1, loc="best")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(path, format="png")


def _swap_in(partial: Path, target: Path) -> None:
    """Replace folder ``target`` by ``partial`` with renames only: readers see the old or the new folder whole."""
    previous = target.with_name(f".{target.name}.previous")
    if not target.exists() and previous.exists():  # an interrupted swap: the previous folder is the last good one
        os.replace(previous, target)
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        os.replace(target, previous)
    os.replace(partial, target)
    shutil.rmtree(previous, ignore_errors=True)


class TrainingCheckpoint:
    """Best and last checkpoints as safetensors folders, written atomically by rank 0; resuming from the last one.

    * ``ckpt_dir/last/``: ``model.safetensors`` + ``config.json`` (``uniseg_hub.load_model`` reads them) and
      ``training_state.pt`` (trainer position, optimizer, scheduler, AMP scaler, best metric, history; tensors and
      numbers, readable with ``torch.load(weights_only=True)``), every ``save_interval`` epochs and at the end;
    * ``ckpt_dir/best/``: the weights of the epoch with the best validation key metric so far, when a validator is
      given (train.json gives one only with ``validation_fraction`` > 0: cases carved from the training list). The
      reported model is ``last/`` after the final epoch, as in the official protocol.

    Each folder is written beside its target and renamed into place, so an interruption leaves the previous
    checkpoint whole. ``resume``: continue from ``last/`` (epoch, iteration, optimizer, scheduler, best metric,
    ``TrainingLog``'s history); otherwise a ``ckpt_dir`` that already holds a run is refused unless ``overwrite``.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, network: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler=None, validator: Engine | None = None, resume: bool = False, overwrite: bool = False,
                 save_interval: int = 1, source: Mapping | None = None):
        if save_interval < 1:
            raise TrainingError(f"save_interval must be 1 or more epochs, got {save_interval}")
        self.ckpt_dir = Path(ckpt_dir)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.resume = parse_bool(resume)
        self.overwrite = parse_bool(overwrite)
        self.save_interval = save_interval
        self.source = {k: (v if isinstance(v, (int, float, bool)) or v is None else str(v))
                       for k, v in dict(source or {}).items()}
        self._saved_iteration = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_last)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self.save_best)

    @property
    def last_dir(self) -> Path:
        return self.ckpt_dir / "last"

    @property
    def best_dir(self) -> Path:
        return self.ckpt_dir / "best"

    def _existing_last(self) -> Path | None:
        """``last/``, or its previous version when an interruption fell between the two renames of a swap."""
        for folder in (self.last_dir, self.last_dir.with_name(".last.previous")):
            if (folder / STATE_FILE).is_file():
                return folder
        return None

    def started(self, engine: Engine) -> None:
        if self.resume:
            self.load(engine)
        elif self._existing_last() is not None and not self.overwrite:
            raise ResumeError(
                f"{self.ckpt_dir} already holds a training run (last/ at epoch "
                f"{self._stored_epoch(self._existing_last())}); continue it with --resume true, start over with "
                "--overwrite true, or choose another --ckpt_dir"
            )

    @staticmethod
    def _stored_epoch(folder: Path) -> int | str:
        try:
            return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)["trainer"]["epoch"]
        except Exception:  # only used in a message
            return "?"

    def _write_folder(self, target: Path, extra_source: Mapping, training_state: Mapping | None) -> None:
        model = unwrap(self.network)
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            save_folder(partial, model.state_dict(), model.config, source={**self.source, **extra_source},
                        tasks=getattr(model, "tasks", None))
            if training_state is not None:
                with atomic_path(partial / STATE_FILE) as tmp:
                    torch.save(dict(training_state), tmp)
            _swap_in(partial, target)
        except OSError as e:  # a full disk, a quota, a vanished mount: the previous checkpoint stays as it was
            shutil.rmtree(partial, ignore_errors=True)
            kept = next((f for f in (target, target.with_name(f".{target.name}.previous")) if f.is_dir()), None)
            raise TrainingError(
                f"could not write the checkpoint {target} ({e.strerror or e}); "
                + (f"the previous checkpoint in {kept} is intact" if kept else "no earlier checkpoint exists")
                + ": free disk space (or choose another --ckpt_dir) and continue with --resume true") from e

    def save_last(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_iteration:
            return
        self._saved_iteration = engine.state.iteration
        if not is_main_process():
            return
        state = {
            "format_version": STATE_FORMAT,
            "trainer": {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                        "epoch_length": engine.state.epoch_length, "max_epochs": engine.state.max_epochs},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "scaler": engine.scaler.state_dict() if getattr(engine, "scaler", None) is not None else {},
            "best_metric": float(self.validator.state.best_metric) if self.validator is not None else -1.0,
            "best_metric_epoch": int(self.validator.state.best_metric_epoch) if self.validator is not None else -1,
            "history": getattr(engine.state, "history", None) or {},
        }
        self._write_folder(self.last_dir, {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                                           "max_epochs": engine.state.max_epochs}, state)

    def save_best(self, evaluator: Engine) -> None:
        state = evaluator.state
        if state.best_metric_epoch != state.epoch or not is_main_process():
            return
        self._write_folder(self.best_dir, {"epoch": state.epoch, state.key_metric_name: float(state.best_metric),
                                           "selected_by": f"{state.key_metric_name} on the validation split carved "
                                                          "from the training cases"}, None)
        log_main(f"epoch {state.epoch}: new best {state.key_metric_name} {state.best_metric:.4f} -> {self.best_dir}")

    def load(self, engine: Engine) -> None:
        folder = self._existing_last()
        if folder is None:
            raise ResumeError(
                f"nothing to resume: {self.last_dir} holds no checkpoint ({STATE_FILE}); start a new run without "
                "--resume, or point --ckpt_dir at the run to continue"
            )
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a damaged pickle or zip
            raise ResumeError(f"cannot read {folder / STATE_FILE} ({type(e).__name__}: {str(e)[:200]}); the "
                              "checkpoint is damaged: start a new run without --resume (or with --overwrite true)") \
                from None
        if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT:
            state = state if isinstance(state, dict) else {}
            raise ResumeError(f"{folder / STATE_FILE} has format {state.get('format_version')}, expected "
                              f"{STATE_FORMAT}; it was written by another uniseg-hub version")
        trainer = state["trainer"]
        if trainer["epoch_length"] != engine.state.epoch_length or trainer["max_epochs"] != engine.state.max_epochs:
            raise ResumeError(
                f"the run in {folder} has {trainer['max_epochs']} epochs of {trainer['epoch_length']} iterations, "
                f"this configuration {engine.state.max_epochs} of {engine.state.epoch_length}; resume with the same "
                "--epochs and --iterations_per_epoch (the learning-rate schedule depends on them)"
            )
        if trainer["epoch"] >= trainer["max_epochs"]:
            raise ResumeError(f"the run in {folder} already finished all {trainer['max_epochs']} epochs; nothing to "
                              "resume (the weights are in best/ and last/)")
        checkpoint = read_folder(folder)
        model = unwrap(self.network)
        if checkpoint.config != model.config:
            raise ResumeError(
                f"{folder} holds a {checkpoint.config.to_dict()['config']} network but this configuration builds "
                f"{model.config.to_dict()['config']}; resume with the same number of classes and channels"
            )
        load_checked(model, checkpoint.state, source=str(folder))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if getattr(engine, "scaler", None) is not None and state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
        if self.validator is not None:
            self.validator.state.best_metric = state["best_metric"]
            self.validator.state.best_metric_epoch = state["best_metric_epoch"]
        if state["history"]:
            engine.state.history = state["history"]
        engine.state.iteration = trainer["iteration"]
        engine.state.epoch = trainer["epoch"]
        self._saved_iteration = trainer["iteration"]
        log_main(f"resumed {folder}: epoch {trainer['epoch']}/{trainer['max_epochs']}, iteration {trainer['iteration']}"
               f", best metric {state['best_metric']:.4f} at epoch {state['best_metric_epoch']}")


def log_metrics(evaluator: Engine, names: Sequence[str], output_dir: str | os.PathLike | None = None,
                provenance: Mapping | None = None) -> dict:
    """Log the key metric and its per-class means (background excluded; a class left out of a case, NaN, is left out
    of its mean) after an evaluation; rank 0 also writes them to ``output_dir/summary.json``.

    ``provenance``: which checkpoint and which inference settings produced the numbers (``checkpoint_provenance``
    plus e.g. ``tta``, ``overlap``); stored under ``evaluated_with`` and logged with the metric.
    Returns ``{"metric": name, "mean": value, "cases": N, "per_class": {...}, "evaluated_with": {...}}``.
    """
    state = evaluator.state
    name = state.key_metric_name
    details = state.metric_details.get(name) if getattr(state, "metric_details", None) else None
    per_class = {}
    if details is not None:
        values = torch.as_tensor(details, dtype=torch.float64)
        for index, class_name in enumerate(names[1:]):
            if index < values.shape[-1]:
                mean = float(torch.nanmean(values[:, index]))
                per_class[class_name] = None if mean != mean else mean
    cases = int(details.shape[0]) if details is not None else None
    mean = float(state.metrics[name])
    summary = {"metric": name, "mean": None if mean != mean else mean, "cases": cases, "per_class": per_class,
               "evaluated_with": dict(provenance or {})}
    lines = [f"{name}: {mean:.4f} over {summary['cases']} case(s)"]
    if provenance:
        lines.append("  evaluated with " + ", ".join(f"{k}={v}" for k, v in provenance.items()))
    lines += [f"  {class_name:<32} " + ("absent" if value is None else f"{value:.4f}")
              for class_name, value in per_class.items()]
    log_main("\n".join(lines))
    if output_dir is not None and is_main_process():
        write_text_atomic(Path(output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
