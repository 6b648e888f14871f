"""The CPU inference fast path, applied from outside to a built network: ``prepare_for_inference(model)``.

The networks of ``uniseg_hub.networks`` are plain eager PyTorch. ``prepare_for_inference`` returns a wrapper that
shares the model's parameters (no copy; the model itself is not changed) and runs the same computation with the
kernels of ``fast_path`` (channels-last maps at the large levels, the fused channels-last instance norm +
LeakyReLU, transposed convolutions as one matrix product) and, for several tasks on one window, each decoder level's
skip term computed once for all tasks. Results equal the plain model's within float32 tolerance.

The wrapper reads the model's structure when it is called instead of assuming the official layout: it walks
``nn.Sequential`` stages and dispatches on the block types it knows (a conv block = ``conv`` (``Conv3d``) then
``adn`` = ``N`` (``InstanceNorm3d``) and ``A`` (``LeakyReLU``); ``MultiChannelStem``; the encoder's and decoder's
loops). Every module it does not know runs as is. Whether a call takes the fast path is decided per call from the
input tensor and torch's per-thread state (``fast_path.active``): gradients off, float32 (also under bfloat16
autocast), CPU, not tracing, compiling or exporting; any other call goes to the plain model. There is no global
state, so one prepared model can serve several threads, and the plain model can be trained or exported while it
does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputShapeError
from ..networks import (
    ConvBlock,
    MultiChannelStem,
    UNetDecoder,
    UniSeg,
    UniSegBackbone,
    UniSegEncoder,
)
from ..networks.blocks import check_divisible
from . import fast_path
from . import memory as _memory


def prepare_for_inference(model: nn.Module, *, retain_freed_memory: bool = False,
                          channels_last_min_voxels: int | None = None) -> nn.Module:
    """The CPU inference form of ``model`` (a ``UniSeg`` or a ``UniSegBackbone``): a wrapper module sharing its
    parameters, with the model's inference API and the same results within float32 tolerance.

    Args:
        model: the network; it is neither copied nor modified (the wrapper holds it as ``.model``, so changes of
            its weights, device or mode apply to both). Returned as is if it is already prepared.
        retain_freed_memory: also call ``uniseg_hub.cpu.memory.retain_freed_memory(True)``: a **process-wide**
            allocator setting (glibc) that speeds up the sliding window's large, repeated blocks and keeps the
            process's memory at its peak; hand it back with ``release_freed_memory()`` after the network phase.
        channels_last_min_voxels: feature maps with at least this many voxels per channel run channels-last
            (default ``fast_path.CHANNELS_LAST_MIN_VOXELS``, measured for the official model on CPU).

    Returns ``CpuInferenceModel`` for a ``UniSeg`` (``encode``, ``decode``, ``decode_tasks``, ``forward(x, task)``)
    and ``CpuInferenceBackbone`` for a ``UniSegBackbone`` (``forward(x)``).
    """
    if isinstance(model, _CpuInference):
        prepared = model
    elif isinstance(model, UniSeg):
        prepared = CpuInferenceModel(model, channels_last_min_voxels)
    elif isinstance(model, UniSegBackbone):
        prepared = CpuInferenceBackbone(model, channels_last_min_voxels)
    else:
        raise TypeError(f"prepare_for_inference takes a UniSeg or a UniSegBackbone, got {type(model).__name__}")
    if retain_freed_memory:
        _memory.retain_freed_memory(True)
    return prepared


class _CpuInference(nn.Module):
    """The fast path's runners for the parts of a network; subclasses give the model's API."""

    def __init__(self, model: nn.Module, channels_last_min_voxels: int | None = None):
        super().__init__()
        self.model = model
        self.min_voxels = (fast_path.CHANNELS_LAST_MIN_VOXELS if channels_last_min_voxels is None
                           else int(channels_last_min_voxels))

    def extra_repr(self) -> str:
        return f"channels_last_min_voxels={self.min_voxels}"

    # ------------------------------------------------------------------------------------------------- modules

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)``, with the fast kernels for the blocks this file knows (call only where ``active``)."""
        if isinstance(module, NormAct):
            return self.norm_act(module, x)
        parts = conv_block_parts(module)
        if parts is not None:
            conv, norm_act = parts
            return self.norm_act(norm_act, conv(fast_path.to_layout(x, self.min_voxels)))
        if _runs_own_forward(module, MultiChannelStem) and is_norm_act(module.norm, module.act):
            key = str(x.shape[1])
            if key not in module.convs:
                return module(x)  # the stem's own error for an unsupported channel count
            # a 1-channel input is channels-last and contiguous at once: the conv may return either layout
            y = fast_path.to_layout(module.convs[key](fast_path.to_layout(x, self.min_voxels)), self.min_voxels)
            return self.norm_act(NormAct(module.norm, module.act), y)
        if _is_plain_sequential(module):
            for child in module:
                x = self.run(child, x)
            return x
        return module(x)

    @staticmethod
    def norm_act(step: NormAct, y: torch.Tensor) -> torch.Tensor:
        """``act(norm(y))``; fused and in place on channels-last maps."""
        if fast_path.is_channels_last(y) and not y.is_contiguous():
            return fast_path.instance_norm_act_(y, step.norm, step.act.negative_slope)
        return step.act(step.norm(y))

    # ------------------------------------------------------------------------------------------------- encoder

    def encoder_maps(self, encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """``encoder(x)``; for a ``UniSegEncoder`` stage by stage through ``run``."""
        if not _runs_own_forward(encoder, UniSegEncoder):
            return encoder(x)
        outputs = []
        for stage in encoder.stages[: max(encoder.out_indices) + 1]:
            x = self.run(stage, x)
            outputs.append(x)
        return [outputs[i] for i in encoder.out_indices]

    # ------------------------------------------------------------------------------------------------- decoder

    def decoder_output(self, decoder: nn.Module, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """``decoder(skips)``; for a ``UNetDecoder`` level by level, each transposed convolution written into its
        concatenation buffer."""
        if not _runs_own_forward(decoder, UNetDecoder):
            return decoder(skips)
        all_levels = decoder.training and decoder.deep_supervision
        x, outputs = skips[-1], []
        last = len(decoder.heads) - 1
        for u, (up, block, head) in enumerate(zip(decoder.upsamples, decoder.blocks, decoder.heads)):
            x = self.run(block, self.upsample_concat(up, x, skips[-(u + 2)]))
            if all_levels or u == last:
                outputs.append(self.head(head, x))
        return outputs[::-1] if all_levels else outputs[-1]

    def upsample_concat(self, up: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``torch.cat([up(x), skip], 1)``, as one matrix product where ``up`` allows it."""
        if fast_path.is_block_upsample(up, x, skip):
            return fast_path.upsample_concat(up, x, skip, self.min_voxels)
        return torch.cat([up(x), skip], 1)

    def upsample(self, up: nn.Module, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``up(x)`` in the fast path's layout, as one matrix product where ``up`` allows it (``like``: a map of
        the output's size)."""
        if fast_path.is_block_upsample(up, x, like):
            return fast_path.upsample(up, x, like, self.min_voxels)
        return fast_path.to_layout(up(x), self.min_voxels)

    def decoder_outputs_shared(self, decoder: nn.Module, skips: Sequence[torch.Tensor],
                               bottlenecks: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The eval-mode ``decoder([*skips, b])`` for each bottleneck ``b`` of ``bottlenecks`` (one per task), the
        skip terms computed once: the first convolution after a level's concatenation is linear in its input
        channels, ``conv(cat[up, skip]) = conv(up, W_up) + conv(skip, W_skip) + b``, and the second and third terms
        do not depend on the task. Levels whose block does not start with a convolution that can be split are
        decoded in full. None when this does not apply (not a ``UNetDecoder``, or one returning several levels).
        """
        if not _runs_own_forward(decoder, UNetDecoder) or (decoder.training and decoder.deep_supervision):
            return None
        levels = []  # per level: (up, block, skip, first conv, its upsampled channels, steps after it, skip term)
        for u, (up, block) in enumerate(zip(decoder.upsamples, decoder.blocks)):
            skip = skips[-(u + 1)]
            split = split_first_conv(block)
            upsampled = split[0].in_channels - skip.shape[1] if split is not None else 0
            if upsampled <= 0:
                levels.append((up, block, skip, None, 0, None, None))
                continue
            conv, rest = split
            term = F.conv3d(fast_path.to_layout(skip, self.min_voxels), conv.weight[:, upsampled:], conv.bias,
                            conv.stride, conv.padding, conv.dilation)
            levels.append((up, block, skip, conv, upsampled, rest, term))
        outputs = []
        for x in bottlenecks:
            for up, block, skip, conv, upsampled, rest, term in levels:
                if term is None:
                    x = self.run(block, self.upsample_concat(up, x, skip))
                    continue
                x = F.conv3d(self.upsample(up, x, skip), conv.weight[:, :upsampled], None, conv.stride,
                             conv.padding, conv.dilation).add_(term)
                for step in rest:
                    x = self.run(step, x)
            outputs.append(self.head(decoder.heads[-1], x))
        return outputs

    @staticmethod
    def head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``head(x)``; a 1x1x1 convolution of a channels-last map as one matrix product into the default layout."""
        if fast_path.is_pointwise_conv(head, x):
            return fast_path.pointwise_conv(head, x)
        return head(x)


class CpuInferenceModel(_CpuInference):
    """A ``UniSeg`` for CPU inference (``prepare_for_inference``): the model's ``encode``, ``decode``,
    ``decode_tasks`` and ``forward`` with the fast path, the model's own methods for any call that cannot take it.

    ``forward``, ``decode`` and ``decode_tasks`` return tensors in PyTorch's default (contiguous) layout. The maps of
    ``encode`` may be channels-last (same shapes and values): they are meant for ``decode``/``decode_tasks``.
    The plain model is ``.model``; ``patch_size``, ``num_tasks`` and ``task_index`` are the model's.
    """

    @property
    def patch_size(self) -> tuple[int, ...]:
        return self.model.patch_size

    @property
    def num_tasks(self) -> int:
        return self.model.num_tasks

    def task_index(self, task: int | str) -> int:
        return self.model.task_index(task)

    def _fast(self, x: torch.Tensor) -> bool:
        cls = type(self.model)  # a subclass that changes these methods runs as it is
        own = all(getattr(cls, name) is getattr(UniSeg, name) for name in ("encode", "decode", "decode_ids",
                                                                            "forward"))
        return own and fast_path.active(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps (the fast path's layout: meant for ``decode``), computed once per window."""
        if not self._fast(x):
            return self.model.encode(x)
        self.model.check_input(x)
        return self.encoder_maps(self.model.encoder, x)

    def decode(self, skips: Sequence[torch.Tensor], task=None) -> torch.Tensor | list[torch.Tensor]:
        """``UniSeg.decode``: prompt the bottleneck for ``task`` and decode, outputs in the default layout."""
        if not self._fast(skips[-1]):
            return _standard(self.model.decode(skips, task))
        ids = self.model.task_ids(task, skips[-1].shape[0], skips[-1].device)
        if bool((ids >= self.model.prompted_tasks).any()):  # an added task: its adapters and heads run plain
            return _standard(self.model.decode_ids(skips, ids))
        return _standard(self.decoder_output(self.model.decoder, [*skips[:-1], self._prompted(skips[-1], ids)]))

    def decode_tasks(self, skips: Sequence[torch.Tensor], tasks: Sequence) -> list[torch.Tensor]:
        """``[decode(skips, t) for t in tasks]``, each decoder level's skip term computed once for all tasks on the
        fast path (a third of the decoder's work per task in the official model)."""
        tasks = list(tasks)
        prompted_only = all(self.model.task_index(t) < self.model.prompted_tasks for t in tasks)
        if len(tasks) > 1 and prompted_only and self._fast(skips[-1]):
            bottleneck = skips[-1]
            prompted = [self._prompted(bottleneck, self.model.task_ids(t, bottleneck.shape[0], bottleneck.device))
                        for t in tasks]
            outputs = self.decoder_outputs_shared(self.model.decoder, skips[:-1], prompted)
            if outputs is not None:
                return [_standard(out) for out in outputs]
        return [self.decode(skips, t) for t in tasks]

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor | list[torch.Tensor]:
        if not self._fast(x):
            return _standard(self.model(x, task))
        return self.decode(self.encode(x), task)

    def _prompted(self, bottleneck: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """The bottleneck with the task's prompt map appended, as ``UniSeg.decode_ids`` builds it."""
        return torch.cat([bottleneck, self.model.prompt(bottleneck, task_ids)], 1)


class CpuInferenceBackbone(_CpuInference):
    """A ``UniSegBackbone`` for CPU inference (``prepare_for_inference``): ``forward(x)`` with the fast path, the
    model's own forward for any call that cannot take it; logits in PyTorch's default (contiguous) layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if type(self.model).forward is not UniSegBackbone.forward or not fast_path.active(x):
            return _standard(self.model(x))
        if x.ndim != 5:
            raise InputShapeError(f"expected a (B, C, x, y, z) tensor, got shape {tuple(x.shape)}")
        check_divisible(x.shape[2:], self.model.total_stride)
        return _standard(self.decoder_output(self.model.decoder, self.encoder_maps(self.model.encoder, x)))


# ----------------------------------------------------------------------------------------------- structure


class NormAct(NamedTuple):
    """An instance norm and the LeakyReLU after it (``is_norm_act``): the second half of a conv block."""

    norm: nn.InstanceNorm3d
    act: nn.LeakyReLU


def is_norm_act(norm: nn.Module, act: nn.Module) -> bool:
    """Whether ``act(norm(y))`` is an instance norm with statistics from ``y`` followed by a LeakyReLU, which
    ``fast_path.instance_norm_act_`` computes."""
    return (type(norm) is nn.InstanceNorm3d and not norm.track_running_stats
            and type(act) is nn.LeakyReLU)


def conv_block_parts(module: nn.Module) -> tuple[nn.Conv3d, NormAct] | None:
    """(conv, (norm, act)) of a conv block: a module whose forward is ``adn(conv(x))`` with ``conv`` a ``Conv3d``
    and ``adn`` a plain ``nn.Sequential`` of an ``InstanceNorm3d`` ``N`` and a ``LeakyReLU`` ``A``
    (``networks.ConvBlock``, MONAI's ``Convolution`` without dropout); None for anything else."""
    if not (_runs_own_forward(module, ConvBlock) or _is_plain_sequential(module)):
        return None
    children = list(module.named_children())
    if [name for name, _ in children] != ["conv", "adn"]:
        return None
    conv, adn = module.conv, module.adn
    if type(conv) is not nn.Conv3d or not _is_plain_sequential(adn) or list(adn._modules) != ["N", "A"]:
        return None
    return (conv, NormAct(adn.N, adn.A)) if is_norm_act(adn.N, adn.A) else None


def split_first_conv(block: nn.Module) -> tuple[nn.Conv3d, list[nn.Module | NormAct]] | None:
    """(the first convolution of ``block``, the steps after it) when ``block`` is that convolution followed by other
    modules: a ``Conv3d`` (zero padding, one group), a conv block, or a plain ``nn.Sequential`` starting with one
    of those. None otherwise."""
    parts = conv_block_parts(block)
    if parts is not None:
        conv, rest = parts[0], [parts[1]]
    elif type(block) is nn.Conv3d:
        conv, rest = block, []
    elif _is_plain_sequential(block) and len(block):
        first = split_first_conv(block[0])
        if first is None:
            return None
        conv, rest = first[0], [*first[1], *list(block)[1:]]
    else:
        return None
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    return conv, rest


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _runs_own_forward(module: nn.Module, cls: type) -> bool:
    """Whether ``module`` is a ``cls`` whose ``forward`` is ``cls``'s own (a subclass may compute something else)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _standard(out):
    """Logits in PyTorch's default layout (a list for deep supervision)."""
    if isinstance(out, (list, tuple)):
        return [o.contiguous() for o in out]
    return out.contiguous()
