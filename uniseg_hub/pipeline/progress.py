"""Labelled progress bars over the stages of one case's inference (issue 18): ``reading``, ``preprocessing``,
``sliding window`` (the inferer's own bar, ``sliding_window.NnUNetSplitter``, with the number of windows) and
``writing``, one tqdm bar each, on stderr, in that order.

``StageBars`` is one object of ``inference.json`` (``stage_progress``, on with the config's ``progress``): an ignite
handler on the evaluator (the preprocessing bar ends with ``GET_BATCH_COMPLETED``, the writing bar begins with
MONAI's ``IterationEvents.FORWARD_COMPLETED``, before the postprocessing, and counts it done at
``ITERATION_COMPLETED``) and the source of ``Stage`` markers, transforms placed in the preprocessing ``Compose``
where the reading and the preprocessing begin. ``writes`` is the number of writing steps: 1, the bundle's
postprocessing (label map, colour tables, format file, probabilities); ``uniseg_hub.app.predict`` adds its own
(volume tables, preview) and ends the bar. Disabled, everything is a no-op and nothing is printed.
"""

from __future__ import annotations

import sys

from monai.transforms import Transform

from ..config import parse_bool

STAGES = ("reading", "preprocessing", "sliding window", "writing")
"""The stages of one case, in the order their bars appear."""

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]{postfix}"
"""A stage bar: label, share, steps done and elapsed time (no rate: a stage's steps are not alike)."""


class StageBars:
    """One tqdm bar (stderr) per stage of a case, the previous one closed when the next begins.

    Args:
        enabled: show the bars (``parse_bool``); off, nothing is printed.
        writes: the number of writing steps (the bundle's postprocessing is one).
        file: where the bars go (default ``sys.stderr`` when a bar is made).
    """

    def __init__(self, enabled: bool = False, writes: int = 1, file=None):
        self.enabled = parse_bool(enabled, "progress")
        self.writes = int(writes)
        self.file = file
        self.bar = None

    def begin(self, stage: str) -> None:
        """Close the current bar and open ``stage``'s (``writes`` steps for writing, else one), in the main process
        only: a DataLoader worker's copy stays silent."""
        self.end(complete=True)
        if not self.enabled or _in_worker():
            return
        from tqdm import tqdm

        self.bar = tqdm(total=self.writes if stage == "writing" else 1, desc=stage, unit="step",
                        bar_format=BAR_FORMAT, dynamic_ncols=True,
                        file=self.file if self.file is not None else sys.stderr)

    def step(self, done: str | None = None) -> None:
        """One step of the current stage done (``done`` names it); the bar closes with its last step."""
        if self.bar is None:
            return
        if done:
            self.bar.set_postfix_str(done, refresh=False)
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.end()

    def end(self, complete: bool = False) -> None:
        """Close the current bar (it stays on the terminal as one line), full if its stage is ``complete`` (the
        next stage began), else where it stopped (a failure)."""
        if self.bar is not None:
            bar, self.bar = self.bar, None
            if complete and bar.n < bar.total:
                bar.update(bar.total - bar.n)
            bar.close()

    def stage(self, name: str) -> Stage:
        """A transform that begins stage ``name`` when the data reaches it (for a ``Compose``)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
        return Stage(self, name)

    def attach(self, engine) -> None:
        """As an ignite handler of the bundle's evaluator (``val_handlers``)."""
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(Events.GET_BATCH_COMPLETED, lambda _: self.end(complete=True))
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, lambda _: self.begin("writing"))
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: self.step("label map"))

    def __getstate__(self) -> dict:  # a DataLoader worker gets the settings, not the open bar
        return {**self.__dict__, "bar": None, "file": None}


class Stage(Transform):
    """Begins a stage of ``StageBars`` and passes the data on unchanged (not invertible: an inverse skips it)."""

    def __init__(self, bars: StageBars, name: str):
        self.bars = bars
        self.name = name

    def __call__(self, data):
        self.bars.begin(self.name)
        return data


def _in_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None
