"""The network as the sliding-window inferer sees it: mirroring, softmax, the all-tasks mode, the CPU fast path.

``MirroredPredictor`` holds the one copy of the official test-time mirroring (every subset of the three spatial
axes, 8 flips, softmax averaged); ``TaskPredictor`` (the universal model, inference.json) and ``BackbonePredictor``
(a fine-tuned downstream network, train.json's ``run evaluate``) only say how one flip becomes probabilities.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from ..config import parse_bool
from ..cpu import prepare_for_inference
from ..tasks import HEAD_CHANNELS, Task

SPATIAL_AXES = (2, 3, 4)


def mirror_axes(mirror: bool) -> list[tuple[int, ...]]:
    """The flips of the official inference: all 8 subsets of the spatial axes of a (B, C, x, y, z) tensor when
    ``mirror``, else only the identity."""
    if not parse_bool(mirror, "mirror"):
        return [()]
    return [axes for n in range(len(SPATIAL_AXES) + 1) for axes in itertools.combinations(SPATIAL_AXES, n)]


class MirroredPredictor(nn.Module):
    """(B, C, *patch) image -> (B, K, *patch) softmax probabilities, averaged over the mirror flips.

    Args:
        model: the network in eval mode.
        mirror: 8-flip mirror test-time augmentation (flip every subset of the three axes, average the softmax),
            on by default as in the official inference (nnU-Net v1 ``_internal_maybe_mirror_and_pred_3D``).
        amp: autocast to float16 on CUDA (the official default there).
        cpu_fast_path: run the model through ``uniseg_hub.cpu.prepare_for_inference`` (on by default): same results
            within float32 tolerance, faster on CPU; it shares the model's parameters and leaves other devices and
            dtypes to the plain model. ``self.model`` is what runs: the prepared wrapper, or ``model`` when off.

    Subclasses implement ``probabilities(x)``: the softmax of one (already flipped) input.
    """

    def __init__(self, model: nn.Module, mirror: bool = True, amp: bool = False, cpu_fast_path: bool = True):
        super().__init__()
        self.model = prepare_for_inference(model) if parse_bool(cpu_fast_path, "cpu_fast_path") else model
        self.flips = mirror_axes(mirror)
        self.amp = parse_bool(amp)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def crop(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The channels returned, taken from the averaged probabilities (all of them here)."""
        return probabilities

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad: inference only, and it lets a prepared model take its CPU fast path (``uniseg_hub.cpu``)
        total = None
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and x.is_cuda)
        for axes in self.flips:
            flipped = torch.flip(x, axes) if axes else x
            with autocast:
                probs = self.probabilities(flipped)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total.add_(probs)
        total /= len(self.flips)
        return self.crop(total)


class TaskPredictor(MirroredPredictor):
    """Wraps ``UniSeg`` for a sliding-window inferer: (B, C, *patch) image -> (B, K, *patch) probabilities.

    Args:
        model: a ``UniSeg`` in eval mode.
        tasks: one task, or several for the all-tasks mode (the encoder runs once per window and flip).
        mirror, amp, cpu_fast_path: as ``MirroredPredictor``.
        crop_classes: keep the task's first C_t channels of the softmax (the official single-task output, K = C_t);
            off keeps all head channels. The all-tasks mode always returns all head channels of every task
            (K = 4 x tasks), because the official merge takes the argmax over all of them.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], mirror: bool = True, crop_classes: bool = True,
                 amp: bool = False, cpu_fast_path: bool = True):
        super().__init__(model, mirror=mirror, amp=amp, cpu_fast_path=cpu_fast_path)
        self.tasks = tuple(tasks)
        self.crop_classes = parse_bool(crop_classes) and len(self.tasks) == 1

    @property
    def out_channels(self) -> int:
        return self.tasks[0].num_classes if self.crop_classes else HEAD_CHANNELS * len(self.tasks)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode_tasks(self.model.encode(x), [t.id for t in self.tasks])
        return torch.cat([one.float().softmax(1) for one in logits], 1)

    def crop(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities[:, : self.out_channels] if self.crop_classes else probabilities


class BackbonePredictor(MirroredPredictor):
    """Wraps a fine-tuned ``UniSegBackbone`` for a sliding-window inferer: (B, C, *patch) image ->
    (B, num_classes, *patch) softmax, averaged over the mirror flips as the official downstream evaluation does.

    Args: as ``MirroredPredictor``. The model must return full-resolution logits (eval mode; ``SupervisedEvaluator``
    puts the wrapper, and so the model, in eval mode).
    """

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if isinstance(logits, (list, tuple)):  # deep supervision (a model left in training mode): full resolution
            logits = logits[0]
        return logits.float().softmax(1)
