"""The CPU inference fast path of the UniSeg networks: same results (float32 tolerance), less time.

With gradients off, a float32 CPU tensor (without autocast, or under bfloat16 autocast), and no tracing,
compilation or export (``active``), the networks of
``uniseg_hub.networks`` prepared by ``uniseg_hub.cpu.prepare_for_inference`` run:

* **channels-last feature maps** (``torch.channels_last_3d``) at the large levels: oneDNN then uses its brgemm 3-D
  convolutions, up to 1.3x faster there than its kernels for PyTorch's default layout; the small, deep levels stay
  in the default layout, where oneDNN's direct kernels are as fast or faster (``CHANNELS_LAST_MIN_VOXELS``);
* **an accurate channels-last instance norm fused with the LeakyReLU** (``instance_norm_act_``): PyTorch has no
  channels-last instance norm on CPU (``F.instance_norm`` copies to the default layout and back), and its
  channels-last ``group_norm``/``batch_norm`` kernels compute the variance in one pass as E[x^2] - E[x]^2, which
  loses up to 1e-3 when |mean| >> std. Here the statistics are merged from cache-sized chunks, each centred on its
  own mean (Chan et al.'s pairwise formula, in float64), and the affine map and activation are applied per chunk,
  in place, while the chunk is in cache;
* **1x1x1 convolutions (the heads) as one matrix product** (``pointwise_conv``) into a default-layout output;
* **transposed convolutions as one matrix product** (``upsample_concat``): kernel = stride means no overlap, so
  the layer is one GEMM written straight into the skip concatenation's buffer, instead of a generic deconvolution
  followed by ``torch.cat``.

These are kernels only: ``uniseg_hub.cpu.inference.prepare_for_inference`` applies them to a network, per call and
only where ``active`` holds; training, CUDA, other dtypes and export take the plain eager path. Nothing here keeps
state between calls (the threshold is an argument, defaulting to ``CHANNELS_LAST_MIN_VOXELS``), so the kernels are
safe to call from several threads. ``benchmarks/NOTES.md`` has the measurements.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS_LAST = torch.channels_last_3d
CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk of the instance norm (4 MB of float32): large enough that per-op overhead is small, small
enough to stay in the CPU's L2/L3 cache between the chunk's operations."""

NORM_THREADS = 1
"""Intra-op threads of the instance norm's small per-chunk operations (``instance_norm_act_``). Each of them is one
OpenMP parallel region that waits for all of its threads; there are thousands per forward, and on a shared machine
a descheduled thread stalls every one of them (2 threads under load: 1.33 s for one full-resolution norm, against
0.07 s on one thread; ``benchmarks/NOTES.md`` attempt 25). ``None`` keeps the caller's thread count."""

CHANNELS_LAST_MIN_VOXELS = 1 << 16
"""Feature maps with at least this many voxels per channel run channels-last (in the official model: the levels at
(192, 192, 64), (96, 96, 64) and (48, 48, 32)); measured per convolution in ``benchmarks/NOTES.md``."""


def active(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may take the fast path: float32 CPU inference, without autocast or under bfloat16
    autocast (``--precision bf16``; ``x`` float32 or bfloat16 then), not traced, compiled or exported.

    Under bfloat16 autocast the convolutions run in bfloat16 (channels-last, as in float32) and the fused norm
    computes in float32 from their bfloat16 outputs (``instance_norm_act_``), as autocast's own norm does.
    A pure function of ``x`` and torch's own state (gradient mode is per thread), so each thread decides for itself.
    """
    if not isinstance(x, torch.Tensor) or torch.is_grad_enabled() or x.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu")
    if autocast and torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False  # float16 autocast on CPU is refused by the predictor; run it as it is anyway
    if x.dtype != torch.float32 and not (autocast and x.dtype == torch.bfloat16):
        return False  # under bfloat16 autocast the encoder's maps (the decoder's input) are bfloat16
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()
                or torch.onnx.is_in_onnx_export())


def layout(x: torch.Tensor, min_voxels: int | None = None) -> torch.memory_format:
    """The fast path's memory format for a feature map of ``x``'s size: channels-last for maps of at least
    ``min_voxels`` voxels per channel (default ``CHANNELS_LAST_MIN_VOXELS``), PyTorch's default layout below."""
    threshold = CHANNELS_LAST_MIN_VOXELS if min_voxels is None else min_voxels
    return CHANNELS_LAST if math.prod(x.shape[2:]) >= threshold else torch.contiguous_format


def to_layout(x: torch.Tensor, min_voxels: int | None = None) -> torch.Tensor:
    """``x`` in the fast path's layout for its size (a copy only when it is not in that layout already).

    A one-channel map is contiguous in both layouts, and PyTorch then treats it as the default one: its
    convolution would run oneDNN's default-layout kernel and return a default-layout map that must be copied again
    (1.1 s against 0.3 s for the official stem at 192x192x64). Such a map gets channels-last strides explicitly
    (a copy of one channel)."""
    memory_format = layout(x, min_voxels)
    if memory_format == CHANNELS_LAST and x.ndim == 5 and x.shape[1] == 1 and x.stride(1) != 1:
        return torch.empty_like(x, memory_format=CHANNELS_LAST).copy_(x)
    return x.contiguous(memory_format=memory_format)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.ndim == 5 and x.is_contiguous(memory_format=CHANNELS_LAST)


def instance_norm_act_(x: torch.Tensor, norm: nn.InstanceNorm3d, negative_slope: float) -> torch.Tensor:
    """``leaky_relu(norm(x), negative_slope)`` in place on a channels-last (B, C, x, y, z) float tensor.

    Statistics per sample and channel over the spatial axes, biased variance, ``norm.eps`` and ``norm.weight`` /
    ``norm.bias`` as ``nn.InstanceNorm3d(affine=True)``; as accurate as ``F.instance_norm`` (tested against float64).
    Runs on ``NORM_THREADS`` intra-op threads (the calling thread's count is restored afterwards).
    """
    with threads(NORM_THREADS):
        return _instance_norm_act_(x, norm, negative_slope)


@contextlib.contextmanager
def threads(count: int | None):
    """Run the block with ``count`` intra-op threads (``torch.set_num_threads``), then restore the caller's count.

    With OpenMP (PyTorch's CPU builds) the count is the calling thread's own setting, so other threads that are
    already running torch keep theirs. ``None`` or the current count changes nothing.
    """
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scale_shift(counts: torch.Tensor, means: torch.Tensor, squares: torch.Tensor,
                 norm: nn.InstanceNorm3d) -> tuple[torch.Tensor, torch.Tensor]:
    """The norm's per-channel ``y = x * scale + shift`` (float64) from per-chunk voxel counts (chunks, 1), means and
    sums of squared deviations from each chunk's own mean (chunks, C), merged with Chan et al.'s formula."""
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    variance = (squares.sum(0) + (counts * (means - mean) ** 2).sum(0)) / total
    scale = torch.rsqrt(variance + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _instance_norm_act_(x: torch.Tensor, norm: nn.InstanceNorm3d, negative_slope: float) -> torch.Tensor:
    if x.dtype != torch.float32:
        return _instance_norm_act_lower_precision_(x, norm, negative_slope)
    channels = x.shape[1]
    rows = max(1, CHUNK_ELEMENTS // channels)
    for sample in x.permute(0, 2, 3, 4, 1).view(x.shape[0], -1, channels):  # (voxels, C) views, never a copy
        chunks = sample.split(rows)
        scratch = torch.empty_like(chunks[0])
        counts = torch.tensor([c.shape[0] for c in chunks], dtype=torch.float64).unsqueeze(1)
        means = torch.empty(len(chunks), channels, dtype=torch.float64)
        squares = torch.empty_like(means)  # per chunk: sum of squared deviations from the chunk's mean
        for i, chunk in enumerate(chunks):
            mean = chunk.mean(0)
            centred = torch.sub(chunk, mean, out=scratch[: chunk.shape[0]])
            means[i], squares[i] = mean, centred.square_().sum(0)
        scale, shift = (v.to(x.dtype) for v in _scale_shift(counts, means, squares, norm))
        for chunk in chunks:
            F.leaky_relu_(chunk.mul_(scale).add_(shift), negative_slope)
    return x


def _instance_norm_act_lower_precision_(x: torch.Tensor, norm: nn.InstanceNorm3d,
                                       negative_slope: float) -> torch.Tensor:
    """``_instance_norm_act_`` for a bfloat16 (or other lower-precision) map: each chunk is read into a float32
    scratch, the statistics and the affine map with the activation are computed there in float32, and the result
    is rounded back into the chunk, in place."""
    channels = x.shape[1]
    rows = max(1, CHUNK_ELEMENTS // channels)
    for sample in x.permute(0, 2, 3, 4, 1).view(x.shape[0], -1, channels):
        chunks = sample.split(rows)
        scratch = torch.empty(chunks[0].shape, dtype=torch.float32, device=x.device)
        counts = torch.tensor([c.shape[0] for c in chunks], dtype=torch.float64).unsqueeze(1)
        means = torch.empty(len(chunks), channels, dtype=torch.float64)
        squares = torch.empty_like(means)
        for i, chunk in enumerate(chunks):
            values = scratch[: chunk.shape[0]].copy_(chunk)
            mean = values.mean(0)
            means[i], squares[i] = mean, values.sub_(mean).square_().sum(0)
        scale, shift = (v.float() for v in _scale_shift(counts, means, squares, norm))
        for chunk in chunks:
            values = scratch[: chunk.shape[0]].copy_(chunk)
            chunk.copy_(F.leaky_relu_(values.mul_(scale).add_(shift), negative_slope))
    return x


def is_pointwise_conv(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` is a 1x1x1 convolution that ``pointwise_conv`` computes for ``x`` (a channels-last map)."""
    return (type(conv) is nn.Conv3d and tuple(conv.kernel_size) == (1, 1, 1) and tuple(conv.stride) == (1, 1, 1)
            and not any(conv.padding) and conv.groups == 1 and conv.padding_mode == "zeros"
            and is_channels_last(x) and not x.is_contiguous() and x.dtype == conv.weight.dtype)


def pointwise_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x).contiguous()`` for a 1x1x1 convolution of a channels-last ``x`` (``is_pointwise_conv``; the
    segmentation heads): one matrix product per sample, (C_out, C_in) @ (C_in, voxels), written straight into a
    default-layout output. PyTorch runs this layer through its slow reference convolution on one thread (1.06 s
    against 0.10 s at 192x192x64, copying ``x`` to the default layout first) and returns a channels-last map that
    then has to be copied to the default layout."""
    batch, channels, *size = x.shape
    out = torch.empty((batch, conv.out_channels, *size), dtype=x.dtype, device=x.device)
    weight = conv.weight.view(conv.out_channels, channels)
    for b in range(batch):
        voxels = x[b].permute(1, 2, 3, 0).reshape(-1, channels)  # (voxels, C_in): a view of channels-last x
        target = out[b].view(conv.out_channels, -1)
        if conv.bias is None:
            torch.mm(weight, voxels.t(), out=target)
        else:
            torch.addmm(conv.bias.unsqueeze(1), weight, voxels.t(), out=target)
    return out


def is_block_upsample(up: nn.Module, x: torch.Tensor, skip: torch.Tensor) -> bool:
    """Whether ``up`` is a transposed conv that ``upsample_concat`` can replace for these inputs."""
    return (isinstance(up, nn.ConvTranspose3d) and up.bias is None and up.groups == 1
            and tuple(up.kernel_size) == tuple(up.stride) and not any(up.padding) and not any(up.output_padding)
            and all(d == 1 for d in up.dilation)
            and list(skip.shape[2:]) == [n * s for n, s in zip(x.shape[2:], up.stride)])


def upsample_concat(up: nn.ConvTranspose3d, x: torch.Tensor, skip: torch.Tensor,
                    min_voxels: int | None = None) -> torch.Tensor:
    """``torch.cat([up(x), skip], 1)`` for a transposed conv whose kernel equals its stride (``is_block_upsample``).

    Every input voxel becomes one non-overlapping (C_out, sx, sy, sz) block, so the layer is one matrix product
    per sample, (voxels, C_in) @ (C_in, sx*sy*sz*C_out), scattered straight into the concatenation buffer. The
    result, (B, C_out + C_skip, *skip size), has the fast path's layout for its size (``layout``).
    """
    out = torch.empty((x.shape[0], up.out_channels + skip.shape[1], *skip.shape[2:]), dtype=x.dtype,
                      device=x.device, memory_format=layout(skip, min_voxels))
    _upsample_into(out[:, : up.out_channels], up, x)
    out[:, up.out_channels:].copy_(skip)
    return out


def upsample(up: nn.ConvTranspose3d, x: torch.Tensor, like: torch.Tensor,
             min_voxels: int | None = None) -> torch.Tensor:
    """``up(x)`` as in ``upsample_concat``, in the fast path's layout; ``like`` is a map of the output's size."""
    out = torch.empty((x.shape[0], up.out_channels, *like.shape[2:]), dtype=x.dtype, device=x.device,
                      memory_format=layout(like, min_voxels))
    _upsample_into(out, up, x)
    return out


def _upsample_into(out: torch.Tensor, up: nn.ConvTranspose3d, x: torch.Tensor) -> None:
    """Write ``up(x)`` into ``out`` (B, C_out, *size * stride), a map or a channel slice of one."""
    batch, c_in, *size = x.shape
    c_out, stride = up.out_channels, tuple(up.stride)
    weight = up.weight.to(x.dtype).permute(0, 2, 3, 4, 1).reshape(c_in, -1)  # (C_in, sx*sy*sz*C_out)
    for b in range(batch):
        voxels = x[b].flatten(1).t() if x.is_contiguous() else x[b].permute(1, 2, 3, 0).reshape(-1, c_in)
        blocks = torch.mm(voxels, weight).view(*size, *stride, c_out)  # X Y Z sx sy sz C_out
        target = out[b].permute(1, 2, 3, 0)  # (X*sx, Y*sy, Z*sz, C_out) view of the output
        for axis in (2, 1, 0):
            target = target.unflatten(axis, (size[axis], stride[axis]))  # -> X sx Y sy Z sz C_out
        target.copy_(blocks.permute(0, 3, 1, 4, 2, 5, 6))
