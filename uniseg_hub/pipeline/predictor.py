"""The network as the sliding-window inferer sees it: mirroring, softmax, the all-tasks mode, the CPU fast path."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..config import parse_bool
from ..cpu import prepare_for_inference
from ..tasks import HEAD_CHANNELS, Task


class TaskPredictor(nn.Module):
    """Wraps ``UniSeg`` for a sliding-window inferer: (B, C, *patch) image -> (B, K, *patch) probabilities.

    Args:
        model: a ``UniSeg`` in eval mode.
        tasks: one task, or several for the all-tasks mode (the encoder runs once per window and flip).
        mirror: 8-flip mirror test-time augmentation (flip every subset of the three axes, average the softmax),
            on by default as in the official inference.
        crop_classes: keep the task's first C_t channels of the softmax (the official single-task output, K = C_t);
            off keeps all head channels. The all-tasks mode always returns all head channels of every task
            (K = 4 x tasks), because the official merge takes the argmax over all of them.
        amp: autocast to float16 on CUDA (the official default there).
        cpu_fast_path: run the model through ``uniseg_hub.cpu.prepare_for_inference`` (on by default): same results
            within float32 tolerance, faster on CPU; it shares the model's parameters and leaves other devices and
            dtypes to the plain model. ``self.model`` is what runs: the prepared wrapper, or ``model`` when off.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], mirror: bool = True, crop_classes: bool = True,
                 amp: bool = False, cpu_fast_path: bool = True):
        super().__init__()
        self.model = prepare_for_inference(model) if parse_bool(cpu_fast_path, "cpu_fast_path") else model
        self.tasks = tuple(tasks)
        self.flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] \
            if parse_bool(mirror) else [()]
        self.crop = parse_bool(crop_classes) and len(self.tasks) == 1
        self.amp = parse_bool(amp)

    @property
    def out_channels(self) -> int:
        return self.tasks[0].num_classes if self.crop else HEAD_CHANNELS * len(self.tasks)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad: inference only, and it lets a prepared model take its CPU fast path (``uniseg_hub.cpu``)
        total = None
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and x.is_cuda)
        for axes in self.flips:
            flipped = torch.flip(x, axes) if axes else x
            with autocast:
                logits = self.model.decode_tasks(self.model.encode(flipped), [t.id for t in self.tasks])
                probs = [one.float().softmax(1) for one in logits]
            probs = torch.cat(probs, 1)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total.add_(probs)
        total /= len(self.flips)
        return total[:, : self.out_channels] if self.crop else total
