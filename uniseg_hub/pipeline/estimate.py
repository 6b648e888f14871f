"""How long a prediction will take, before it runs: sliding-window positions x the time of one window.

The number of positions follows from the scan's grid: resampled to the task's spacing (nnU-Net v1's grid size,
``resampling.resampled_shape``), then the positions of the bundle's default window, nnU-Net v1's
(``sliding_window.window_starts``: one window along an axis not longer than the patch). The
time of one window is measured: the network's encoder once and one task's decoder once, on a patch of zeros, on
the device that will run, after one untimed pass that pays the one-off costs (the all-tasks mode runs the encoder
once and every task's decoder per window; mirroring multiplies by 8). Resampling, loading and writing are not
counted: on a CPU the network dominates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..tasks import Task
from .resampling import resampled_shape
from .sliding_window import window_starts

MIRROR_PASSES = 8
"""Network passes per window with test-time mirroring (every subset of the three axes flipped)."""


def window_positions(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float],
                     patch_size: Sequence[int], overlap: float = 0.5) -> int:
    """Sliding-window positions for a scan of ``shape`` voxels of ``spacing`` mm, resampled to ``target_spacing``."""
    starts = window_starts(resampled_shape(shape, spacing, target_spacing), patch_size, overlap)
    return math.prod(len(axis) for axis in starts)


@dataclass(frozen=True)
class WindowTimes:
    """Seconds of the encoder and of one task's decoder on one patch, as measured."""

    encode: float
    decode: float
    device: str

    def window(self, tasks: int = 1, mirror: bool = False) -> float:
        """Seconds per sliding-window position for ``tasks`` tasks (the all-tasks mode shares the encoder)."""
        return (self.encode + tasks * self.decode) * (MIRROR_PASSES if mirror else 1)


def time_window(model: torch.nn.Module, task: Task, device: str | torch.device | None = None,
                cpu_fast_path: bool = True, warmup: int = 1) -> WindowTimes:
    """Time the encoder and one decoder of ``model`` (a ``UniSeg``) on one patch of zeros, as the predictor runs
    them (``TaskPredictor``: the CPU fast path unless ``cpu_fast_path`` is off), after ``warmup`` untimed passes
    (the first pass pays one-off costs: kernel selection, allocation)."""
    from .predictor import TaskPredictor

    device = torch.device(device) if device is not None else next(model.parameters()).device
    runner = TaskPredictor(model.to(device).eval(), [task], mirror=False, cpu_fast_path=cpu_fast_path).model
    patch = torch.zeros((1, task.num_channels, *model.patch_size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(1 + warmup):  # the last pass counts
            start = time.perf_counter()
            features = runner.encode(patch)
            sync()
            encoded = time.perf_counter()
            runner.decode_tasks(features, [task.id])
            sync()
            decoded = time.perf_counter()
    return WindowTimes(encode=encoded - start, decode=decoded - encoded, device=str(device))


@dataclass(frozen=True)
class RunEstimate:
    """The expected duration of one prediction (one task, or the all-tasks mode)."""

    task: str
    tasks: int
    windows: int
    passes_per_window: int
    seconds_per_window: float
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_run(shape: Sequence[int], spacing: Sequence[float], tasks: Sequence[Task], patch_size: Sequence[int],
                 times: WindowTimes, overlap: float = 0.5, mirror: bool = False) -> RunEstimate:
    """The duration of predicting ``tasks`` (one, or the all-tasks mode's group, run at the first task's spacing)
    on a scan of ``shape`` voxels of ``spacing`` mm, from measured ``times``."""
    windows = window_positions(shape, spacing, tasks[0].spacing, patch_size, overlap)
    per_window = times.window(len(tasks), mirror)
    return RunEstimate(task=tasks[0].name if len(tasks) == 1 else "all", tasks=len(tasks), windows=windows,
                       passes_per_window=MIRROR_PASSES if mirror else 1, seconds_per_window=round(per_window, 3),
                       seconds=round(windows * per_window, 1))
