"""The network as the sliding-window inferer sees it: mirroring, softmax, the all-tasks mode, the CPU fast path.

``MirroredPredictor`` holds the one copy of the official test-time mirroring (every subset of the three spatial
axes, 8 flips, softmax averaged); ``TaskPredictor`` (the universal model, inference.json) and ``BackbonePredictor``
(a fine-tuned downstream network, train.json's ``run evaluate``) only say how one flip becomes probabilities.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..config import parse_bool, parse_precision, parse_tta
from ..cpu import native_bf16, prepare_for_inference
from ..errors import ConfigError
from ..tasks import Task
from ..weights import PRECISION_DTYPES

logger = logging.getLogger(__name__)

SPATIAL_AXES = (2, 3, 4)
MIRRORED_AXES = {8: SPATIAL_AXES, 4: (2, 3), 2: (2,), 1: ()}
"""The axes of a (B, C, x, y, z) tensor each TTA level mirrors (``config.TTA_LEVELS``): all three, the in-plane x
and y (z is the slice axis of most scans), x alone, none."""


def mirror_axes(mirror: bool | int = 8) -> list[tuple[int, ...]]:
    """The flips of a TTA level (``config.parse_tta``): every subset of ``MIRRORED_AXES[level]``; the official
    inference's 8 subsets of the spatial axes for ``True`` or 8, only the identity for ``False`` or 1. Every level's
    flips are a subset of the 8, and the identity comes first."""
    axes = MIRRORED_AXES[parse_tta(mirror, "mirror")]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def autocast_dtype(precision: str, device_type: str, amp: bool = False) -> torch.dtype | None:
    """The autocast dtype for a precision (``config.PRECISIONS``) on a device type, or None for float32.

    ``auto`` is the official inference: float16 on CUDA when ``amp``, float32 otherwise. ``fp16`` on CPU is a
    ``ConfigError`` (slow, and not the official CPU behaviour); ``bf16`` on a CPU without native bfloat16 logs one
    warning (it runs, emulated, usually slower than float32).
    """
    precision = parse_precision(precision)
    if precision == "auto":
        precision = "fp16" if amp and device_type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if device_type == "cpu" and precision == "fp16":
        raise ConfigError("precision fp16 runs on CUDA only; on CPU use fp32 (the default) or bf16")
    if device_type == "cpu" and precision == "bf16" and not native_bf16():
        logger.warning("precision bf16: this CPU has no native bfloat16 (AMX or AVX512_BF16), so it is emulated and "
                       "likely slower than fp32; leave --precision out for float32")
    return PRECISION_DTYPES[precision]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str) -> str | None:
    """``MirroredPredictor``'s ``compile``: None (off), or a ``torch.compile`` mode (``True`` is ``default``)."""
    if isinstance(value, str) and value.strip().lower() in COMPILE_MODES:
        return value.strip().lower()
    try:
        return "default" if parse_bool(value, "compile") else None
    except ConfigError:
        raise ConfigError(f"compile must be true/false or one of {', '.join(COMPILE_MODES)}, got {value!r}") from None


class MirroredPredictor(nn.Module):
    """(B, C, *patch) image -> (B, K, *patch) softmax probabilities, averaged over the mirror flips.

    Args:
        model: the network in eval mode.
        mirror: mirror test-time augmentation: 8 flips (every subset of the three axes, softmax averaged) by default
            as in the official inference (nnU-Net v1 ``_internal_maybe_mirror_and_pred_3D``); 4, 2 or 1 flips
            (``mirror_axes``), or a switch (true = 8, false = 1).
        amp: autocast to float16 on CUDA (the official default there) when ``precision`` is ``auto``.
        precision: ``config.PRECISIONS``: ``auto`` (the official: ``amp`` on CUDA, float32 on CPU), ``fp32``,
            ``bf16`` or ``fp16`` autocast (``autocast_dtype``). A model whose weights are in another dtype
            (``load_model(dtype=...)``) gets its input in that dtype.
        compile: ``torch.compile`` the per-flip network call (off by default): ``True`` or a mode, e.g.
            ``reduce-overhead`` (CUDA graphs on CUDA) or ``max-autotune``; the CPU fast path steps aside while
            compiled code runs. Measured in ``benchmarks/gpu.sh``; compiling takes minutes on a small CPU.
        cpu_fast_path: run the model through ``uniseg_hub.cpu.prepare_for_inference`` (on by default): same results
            within float32 tolerance, faster on CPU; it shares the model's parameters and leaves other devices and
            dtypes to the plain model. ``self.model`` is what runs: the prepared wrapper, or ``model`` when off.

    Subclasses implement ``probabilities(x)``: the softmax of one (already flipped) input.
    """

    def __init__(self, model: nn.Module, mirror: bool | int = True, amp: bool = False, cpu_fast_path: bool = True,
                 precision: str = "auto", compile: bool | str = False):
        super().__init__()
        self.model = prepare_for_inference(model) if parse_bool(cpu_fast_path, "cpu_fast_path") else model
        self.flips = mirror_axes(mirror)
        self.amp = parse_bool(amp)
        self.precision = parse_precision(precision)
        self.compile_mode = compile_mode(compile)
        self._probabilities = self.probabilities
        if self.compile_mode is not None:
            self._probabilities = torch.compile(self.probabilities, mode=self.compile_mode)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def crop(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The channels returned, taken from the averaged probabilities (all of them here)."""
        return probabilities

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # no_grad: inference only, and it lets a prepared model take its CPU fast path (``uniseg_hub.cpu``)
        total = None
        dtype = autocast_dtype(self.precision, x.device.type, self.amp)
        if not torch.amp.is_autocast_available(x.device.type):  # e.g. the meta device (FLOP counting)
            dtype = None
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        weights = next(self.model.parameters(), None)
        if weights is not None and weights.is_floating_point() and weights.dtype != x.dtype and dtype is None:
            x = x.to(weights.dtype)  # a model loaded in another dtype (load_model(dtype=...))
        for axes in self.flips:
            flipped = torch.flip(x, axes) if axes else x
            with autocast:
                probs = self._probabilities(flipped)
            probs = torch.flip(probs, axes) if axes else probs
            total = probs if total is None else total.add_(probs)
        total /= len(self.flips)
        return self.crop(total)


class TaskPredictor(MirroredPredictor):
    """Wraps ``UniSeg`` for a sliding-window inferer: (B, C, *patch) image -> (B, K, *patch) probabilities.

    Args:
        model: a ``UniSeg`` in eval mode.
        tasks: one task, or several for the all-tasks mode (the encoder runs once per window and flip).
        mirror, amp, cpu_fast_path, precision, compile: as ``MirroredPredictor``.
        crop_classes: keep the task's first C_t channels of the softmax (the official single-task output, K = C_t);
            off keeps all its logit channels (``UniSeg.output_channels``: the 4 head channels of a prompted task,
            an added task's own C_t). The all-tasks mode always returns all channels of every task, one after the
            other, because the official merge takes the argmax over all of them.
    """

    def __init__(self, model: nn.Module, tasks: Sequence[Task], mirror: bool | int = True, crop_classes: bool = True,
                 amp: bool = False, cpu_fast_path: bool = True, precision: str = "auto", compile: bool | str = False):
        super().__init__(model, mirror=mirror, amp=amp, cpu_fast_path=cpu_fast_path, precision=precision,
                         compile=compile)
        self.tasks = tuple(tasks)
        self.crop_classes = parse_bool(crop_classes) and len(self.tasks) == 1

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode_tasks(self.model.encode(x), [t.id for t in self.tasks])
        return torch.cat([one.float().softmax(1) for one in logits], 1)

    def crop(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities[:, : self.tasks[0].num_classes] if self.crop_classes else probabilities


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
