"""UniSeg in MONAI form: the universal prompt-driven model, its encoder, and the downstream backbone.

Axis order is MONAI's: tensors are (B, C, x, y, z). The official nnU-Net v1 model works in (z, y, x); converted
weights have their spatial axes reversed (see ``uniseg_hub.weights``), so the official patch (64, 192, 192) is
(192, 192, 64) here and the first stage's kernel (1, 3, 3) is (3, 3, 1).

Layout (defaults = the official 11-task model, ``shared/reference/uniseg-official.md`` §1):

* encoder: six stages of two conv blocks (conv, InstanceNorm(affine), LeakyReLU(0.01)) with 32-64-128-256-320-320
  features; the first conv of stages 1-5 is strided (2,2,1), then (2,2,2) four times. Stage 0 has three input
  stems (1, 2, 4 channels) chosen by the input's channel count, sharing one InstanceNorm;
* task prompt: a learnable universal prompt (1, T, 6, 6, 4) is concatenated with the bottleneck and fused by three
  conv blocks (widths (320+T)//4, (320+T)//4, T) into T task prompts; the selected task's map is appended to the
  bottleneck, so 321 channels enter the first transposed convolution;
* decoder: five levels of transposed conv (no bias, kernel = stride) + skip concatenation + two 3x3x3 conv blocks
  (the full-resolution level uses 3x3x3 too, an nnU-Net v1 quirk); one shared bias-free 1x1x1 head per level.

Conv biases: every convolution of the official model has a bias and feeds an InstanceNorm, which removes it, so the
biases have no effect on any output. They are kept, so that parameter counts and state dicts match the official
ones tensor for tensor (32,114,381 parameters, 115 tensors).

CPU inference: with gradients off, float32 CPU tensors take ``uniseg_hub.fast_path`` (channels-last feature maps,
a fused channels-last instance norm + LeakyReLU, transposed convolutions as one matrix product), which gives the
same results within float32 tolerance in less time; training, CUDA, tracing and export take the plain eager path.
On that path the encoder's feature maps are channels-last tensors (same shapes and values); the logits are returned
in PyTorch's default layout.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_path
from .errors import InputShapeError, UnknownTaskError
from .tasks import HEAD_CHANNELS, TASKS, get_task

FEATURES = (32, 64, 128, 256, 320, 320)
KERNEL_SIZES = ((3, 3, 1),) + ((3, 3, 3),) * 5
STRIDES = ((1, 1, 1), (2, 2, 1)) + ((2, 2, 2),) * 4
IN_CHANNELS = (1, 2, 4)
PATCH_SIZE = (192, 192, 64)
NEGATIVE_SLOPE = 0.01

Triple = Sequence[int]


def same_padding(kernel_size: Triple, stride: Triple = (1, 1, 1)) -> tuple[int, ...]:
    """Padding ``(k - s + 1) // 2`` per axis, as MONAI's ``get_padding``: keeps the size at stride 1 (odd kernels)
    and divides it by the stride otherwise."""
    if any(k - s + 1 < 0 for k, s in zip(kernel_size, stride)):
        raise ValueError(f"kernel {tuple(kernel_size)} is smaller than stride {tuple(stride)} allows")
    return tuple((k - s + 1) // 2 for k, s in zip(kernel_size, stride))


class ConvBlock(nn.Sequential):
    """Conv3d (with bias) -> InstanceNorm3d(affine, eps 1e-5) -> LeakyReLU(0.01), 'same' padding for stride 1.

    The modules and state-dict keys of MONAI's ``Convolution`` block (``conv``, ``adn.N``, ``adn.A``), built from
    ``torch.nn`` alone so that importing the network does not import MONAI (seconds). On the CPU inference fast
    path the norm and activation run as one in-place channels-last kernel (``uniseg_hub.fast_path``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, stride: Triple = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, tuple(kernel_size), tuple(stride),
                              padding=same_padding(kernel_size, stride), bias=True)
        self.adn = nn.Sequential(OrderedDict(N=nn.InstanceNorm3d(out_channels, affine=True),
                                             A=nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_path.active(x):
            return self.adn(self.conv(x))
        return self.norm_act(self.conv(fast_path.to_layout(x)))

    def norm_act(self, y: torch.Tensor) -> torch.Tensor:
        """Norm and activation of a conv output; fused and in place for the fast path's channels-last maps."""
        if fast_path.active(y) and fast_path.is_channels_last(y) and not y.is_contiguous():
            return fast_path.instance_norm_act_(y, self.adn.N, self.adn.A.negative_slope)
        return self.adn(y)


def init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming-normal conv and transposed-conv weights, zero biases.

    Apply with ``net.apply(init_he)``; the prompt keeps its N(0, 1) initialisation, as in the official model.
    """
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and not module.weight.is_meta:  # meta: no values
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def total_stride(strides: Sequence[Triple]) -> tuple[int, ...]:
    """Product of all stage strides per axis: the factor an input size must be divisible by."""
    return tuple(math.prod(s[axis] for s in strides) for axis in range(3))


class FeatureInfo(list):
    """timm-style feature description: a list of ``{"num_chs", "reduction", "module"}`` dicts with helpers.

    ``reduction`` is a per-axis tuple because UniSeg's downsampling is anisotropic.
    """

    def channels(self, idx: int | None = None):
        return [f["num_chs"] for f in self] if idx is None else self[idx]["num_chs"]

    def reduction(self, idx: int | None = None):
        return [f["reduction"] for f in self] if idx is None else self[idx]["reduction"]

    def module_name(self, idx: int | None = None):
        return [f["module"] for f in self] if idx is None else self[idx]["module"]


class MultiChannelStem(nn.Module):
    """The first convolution of UniSeg: one conv per supported channel count, a shared InstanceNorm + LeakyReLU.

    Args:
        in_channels: the channel counts with a stem of their own, e.g. (1, 2, 4).
        out_channels: features of stage 0.
        kernel_size: kernel of stage 0, (3, 3, 1) in the official model.

    Input (B, C, x, y, z) with C in ``in_channels``; output (B, out_channels, x, y, z).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, kernel_size: Triple):
        super().__init__()
        padding = same_padding(kernel_size)
        self.convs = nn.ModuleDict(
            {str(c): nn.Conv3d(c, out_channels, tuple(kernel_size), padding=padding, bias=True) for c in in_channels}
        )
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    @property
    def in_channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.shape[1])
        if key not in self.convs:
            raise InputShapeError(
                f"input has {x.shape[1]} channels, but this model has stems for {list(self.in_channels)} channels "
                "only; pass an image with one of those channel counts"
            )
        if fast_path.active(x):
            y = fast_path.to_layout(self.convs[key](fast_path.to_layout(x)))  # 1-channel input: ambiguous layout
            if fast_path.is_channels_last(y) and not y.is_contiguous():
                return fast_path.instance_norm_act_(y, self.norm, self.act.negative_slope)
            return self.act(self.norm(y))
        return self.act(self.norm(self.convs[key](x)))


class UniSegEncoder(nn.Module):
    """The six-stage UniSeg encoder, usable on its own as a pretrained backbone.

    Args:
        in_channels: channel counts with a stem (the official model has 1, 2 and 4).
        features: output features of each stage.
        kernel_sizes: conv kernel of each stage (MONAI axis order).
        strides: stride of each stage's first conv; stage 0 is not strided.
        out_indices: which stage outputs ``forward`` returns (default: all six).

    ``forward(x)`` takes (B, C, x, y, z) and returns a list of feature maps; stage ``i`` has
    ``feature_info.channels(i)`` channels and its size is the input size divided by ``feature_info.reduction(i)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = IN_CHANNELS,
        features: Sequence[int] = FEATURES,
        kernel_sizes: Sequence[Triple] = KERNEL_SIZES,
        strides: Sequence[Triple] = STRIDES,
        out_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        if not len(features) == len(kernel_sizes) == len(strides):
            raise ValueError("features, kernel_sizes and strides need one entry per stage")
        stages = [nn.Sequential(MultiChannelStem(in_channels, features[0], kernel_sizes[0]),
                                ConvBlock(features[0], features[0], kernel_sizes[0]))]
        for s in range(1, len(features)):
            stages.append(nn.Sequential(ConvBlock(features[s - 1], features[s], kernel_sizes[s], strides[s]),
                                        ConvBlock(features[s], features[s], kernel_sizes[s])))
        self.stages = nn.ModuleList(stages)
        self.out_indices = tuple(range(len(features)) if out_indices is None else out_indices)
        if not self.out_indices or any(not -len(features) <= i < len(features) for i in self.out_indices):
            raise ValueError(f"out_indices {list(self.out_indices)} must select stages 0-{len(features) - 1}")
        self.out_indices = tuple(i % len(features) for i in self.out_indices)
        self.feature_info = FeatureInfo(
            {"num_chs": features[i], "reduction": total_stride(strides[: i + 1]), "module": f"stages.{i}"}
            for i in self.out_indices
        )
        self.apply(init_he)

    @property
    def in_channels(self) -> tuple[int, ...]:
        return self.stages[0][0].in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, stage in enumerate(self.stages[: max(self.out_indices) + 1]):
            x = stage(x)
            outputs.append(x)
        return [outputs[i] for i in self.out_indices]


class TaskPrompt(nn.Module):
    """Universal prompt + FUSE: turns the bottleneck into the selected task's one-channel prompt.

    Args:
        channels: bottleneck features (320).
        num_tasks: T, one prompt channel per task.
        prompt_size: spatial size of the universal prompt, the bottleneck size of the training patch (6, 6, 4).
        kernel_size: kernel of the fusion convs (the bottleneck kernel, 3x3x3).

    ``forward(bottleneck (B, channels, *S), task_ids (B,))`` returns (B, 1, *S). When ``S`` differs from
    ``prompt_size`` the prompt is resized trilinearly (a deviation from the official model, which only ever sees S =
    prompt_size; the caller decides whether that is allowed).
    """

    def __init__(self, channels: int, num_tasks: int, prompt_size: Triple, kernel_size: Triple = (3, 3, 3)):
        super().__init__()
        self.universal = nn.Parameter(torch.randn(1, num_tasks, *prompt_size))
        hidden = (channels + num_tasks) // 4
        self.fusion = nn.Sequential(
            ConvBlock(channels + num_tasks, hidden, kernel_size),
            ConvBlock(hidden, hidden, kernel_size),
            ConvBlock(hidden, num_tasks, kernel_size),
        )

    def forward(self, bottleneck: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        prompt = self.universal
        if prompt.shape[2:] != bottleneck.shape[2:]:
            prompt = F.interpolate(prompt, size=bottleneck.shape[2:], mode="trilinear", align_corners=False)
        batch = bottleneck.shape[0]
        fused = self.fusion(torch.cat([bottleneck, prompt.expand(batch, -1, -1, -1, -1).to(bottleneck.dtype)], 1))
        index = task_ids.view(batch, 1, 1, 1, 1).expand(batch, 1, *fused.shape[2:])
        return fused.gather(1, index)


class UNetDecoder(nn.Module):
    """nnU-Net v1 decoder: per level a transposed conv, skip concatenation, two conv blocks and a 1x1x1 head.

    Args:
        features, kernel_sizes, strides: the encoder's per-stage lists; level ``u`` (0 = deepest) upsamples stage
            ``n-1-u`` with kernel = stride = ``strides[n-1-u]`` and uses ``kernel_sizes[n-1-u]`` for its convs.
        head_channels: output channels of every head.
        bottleneck_extra: extra channels appended to the bottleneck before the first level (1 for the task prompt).
        deep_supervision: in training mode return the outputs of all levels.

    ``forward(skips)`` takes the encoder's six maps (bottleneck last) and returns the full-resolution logits
    (B, head_channels, *input size) in eval mode, and in training mode (with deep supervision) the list of all
    levels' logits, full resolution first, then each coarser level (five in the official model).
    """

    def __init__(
        self,
        features: Sequence[int],
        kernel_sizes: Sequence[Triple],
        strides: Sequence[Triple],
        head_channels: int,
        bottleneck_extra: int = 0,
        deep_supervision: bool = True,
    ):
        super().__init__()
        self.deep_supervision = deep_supervision
        upsamples, blocks, heads = [], [], []
        for s in range(len(features) - 1, 0, -1):
            in_ch = features[s] + (bottleneck_extra if s == len(features) - 1 else 0)
            out_ch = features[s - 1]
            upsamples.append(nn.ConvTranspose3d(in_ch, out_ch, tuple(strides[s]), tuple(strides[s]), bias=False))
            blocks.append(nn.Sequential(ConvBlock(2 * out_ch, out_ch, kernel_sizes[s]),
                                        ConvBlock(out_ch, out_ch, kernel_sizes[s])))
            heads.append(nn.Conv3d(out_ch, head_channels, 1, bias=False))
        self.upsamples = nn.ModuleList(upsamples)
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    def can_share_skip_terms(self, skips: Sequence[torch.Tensor]) -> bool:
        """Whether ``skip_terms`` / ``forward_with_skip_terms`` apply: CPU fast path, eval mode, block upsampling."""
        return (fast_path.active(skips[-1]) and not self.training
                and all(fast_path.is_block_upsample(up, x, skip) for up, x, skip in zip(
                    self.upsamples, [skips[-1], *skips[-2:0:-1]], skips[-2::-1])))

    def skip_terms(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per level, the skip connection's share of its first convolution, with the bias: the convolution of
        ``cat([up(x), skip])`` is ``conv(up(x), W_up) + conv(skip, W_skip) + b``, and the second term does not
        depend on the task. The all-tasks mode computes it once per window for every task."""
        terms = []
        for u, (up, block) in enumerate(zip(self.upsamples, self.blocks)):
            conv = block[0].conv
            terms.append(F.conv3d(fast_path.to_layout(skips[-(u + 2)]), conv.weight[:, up.out_channels:], conv.bias,
                                  conv.stride, conv.padding))
        return terms

    def forward_with_skip_terms(self, x: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
        """The eval-mode ``forward`` from the (prompted) bottleneck ``x`` and the levels' ``skip_terms``."""
        for up, block, term in zip(self.upsamples, self.blocks, terms):
            conv = block[0].conv
            y = F.conv3d(fast_path.upsample(up, x, term), conv.weight[:, : up.out_channels], None, conv.stride,
                         conv.padding)
            x = block[1](block[0].norm_act(y.add_(term)))
        return self.heads[-1](x).contiguous()

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        all_levels = self.training and self.deep_supervision
        x = skips[-1]
        outputs = []
        for u, (up, block, head) in enumerate(zip(self.upsamples, self.blocks, self.heads)):
            skip = skips[-(u + 2)]
            if fast_path.active(x) and fast_path.is_block_upsample(up, x, skip):
                x = block(fast_path.upsample_concat(up, x, skip))
            else:
                x = block(torch.cat([up(x), skip], 1))
            if all_levels or u == len(self.heads) - 1:
                outputs.append(head(x))
        return outputs[::-1] if all_levels else outputs[-1].contiguous()


def _check_divisible(spatial: Sequence[int], stride: Sequence[int]) -> None:
    if any(n % s for n, s in zip(spatial, stride)):
        raise InputShapeError(
            f"input size {tuple(spatial)} is not divisible by the network's total stride {tuple(stride)}; "
            "pad or crop the image, or use sliding-window inference with the model's patch size"
        )


class UniSeg(nn.Module):
    """The universal UniSeg model: encoder, task prompt, decoder with one shared head.

    Args:
        in_channels: channel counts with an input stem (1, 2, 4).
        features, kernel_sizes, strides: per-stage lists (MONAI axis order); defaults are the official model.
        num_tasks: T, the number of tasks (prompt channels); 11 officially, see ``uniseg_hub.tasks``.
        head_channels: width of the shared head (4); task ``t`` uses its first C_t channels.
        patch_size: the training patch (192, 192, 64); fixes the prompt's size to patch / total stride.
        resize_prompt: accept other sizes divisible by the total stride by resizing the prompt trilinearly to the
            bottleneck. A deviation from the official model, which accepts the training patch only (default off).
        deep_supervision: in training mode return the logits of all five decoder levels.
        default_task: task used when ``forward`` gets none (lets ``net(x)`` work, e.g. for MONAI's checks).

    ``forward(x, task)``: ``x`` is (B, C, *patch_size) with C in ``in_channels``; ``task`` is a task id, a task name
    (``"liver"``, ``"brats"``, only when T = 11) or a LongTensor (B,) of ids for a mixed-task batch (each sample gets
    its own prompt; a single-task batch gives exactly the official result). Returns the full-resolution logits
    (B, head_channels, *patch_size) in eval mode; in training mode with deep supervision a list of five logits, full
    resolution first. The logits cover all ``head_channels``; the official inference takes the softmax over all of
    them and keeps the task's first C_t channels (``tasks.get_task(t).num_classes``).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = IN_CHANNELS,
        features: Sequence[int] = FEATURES,
        kernel_sizes: Sequence[Triple] = KERNEL_SIZES,
        strides: Sequence[Triple] = STRIDES,
        num_tasks: int = len(TASKS),
        head_channels: int = HEAD_CHANNELS,
        patch_size: Triple = PATCH_SIZE,
        resize_prompt: bool = False,
        deep_supervision: bool = True,
        default_task: int | str = 0,
    ):
        super().__init__()
        self.config = {
            "in_channels": list(in_channels), "features": list(features),
            "kernel_sizes": [list(k) for k in kernel_sizes], "strides": [list(s) for s in strides],
            "num_tasks": num_tasks, "head_channels": head_channels, "patch_size": list(patch_size),
        }
        self.patch_size = tuple(patch_size)
        self.total_stride = total_stride(strides)
        _check_divisible(self.patch_size, self.total_stride)
        self.resize_prompt = resize_prompt
        self.num_tasks = num_tasks
        self.encoder = UniSegEncoder(in_channels, features, kernel_sizes, strides)
        prompt_size = tuple(p // s for p, s in zip(self.patch_size, self.total_stride))
        self.prompt = TaskPrompt(features[-1], num_tasks, prompt_size, kernel_sizes[-1])
        self.decoder = UNetDecoder(features, kernel_sizes, strides, head_channels, 1, deep_supervision)
        self.default_task = self.task_index(default_task)
        self.apply(init_he)

    def task_index(self, task: int | str) -> int:
        """Resolve a task id or name to the prompt index, with an error that lists the valid tasks."""
        if isinstance(task, str) and not task.strip().isdigit():
            if self.num_tasks != len(TASKS):
                raise UnknownTaskError(
                    f"task names only exist for the official {len(TASKS)} tasks; this model has {self.num_tasks} "
                    f"tasks: pass an id from 0 to {self.num_tasks - 1}"
                )
            return get_task(task).id
        index = int(task)
        if not 0 <= index < self.num_tasks:
            names = ", ".join(t.name for t in TASKS) if self.num_tasks == len(TASKS) else ""
            raise UnknownTaskError(
                f"task id {index} is out of range: this model has tasks 0-{self.num_tasks - 1}"
                + (f" ({names})" if names else "")
            )
        return index

    def task_ids(self, task, batch: int, device: torch.device) -> torch.Tensor:
        """The (B,) LongTensor of prompt indices for ``task`` (None, id, name or tensor)."""
        if task is None:
            task = self.default_task
        if isinstance(task, torch.Tensor):
            ids = task.to(device=device, dtype=torch.long).reshape(-1)
            if ids.numel() == 1:
                ids = ids.expand(batch)
            if ids.numel() != batch:
                raise UnknownTaskError(f"got {ids.numel()} task ids for a batch of {batch}; pass one id per sample")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
                raise UnknownTaskError(f"task ids must lie in 0-{self.num_tasks - 1}, got {ids.tolist()}")
            return ids
        return torch.full((batch,), self.task_index(task), dtype=torch.long, device=device)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InputShapeError`` unless ``x`` is (B, C, *size) with an accepted size."""
        if x.ndim != 5:
            raise InputShapeError(f"expected a (B, C, x, y, z) tensor, got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if self.resize_prompt:
            _check_divisible(spatial, self.total_stride)
        elif spatial != self.patch_size:
            raise InputShapeError(
                f"input size {spatial} is not accepted: like the official model, this network takes "
                f"{self.patch_size} patches only (x, y, z); run it through sliding-window inference with "
                f"roi_size={self.patch_size}, or build it with resize_prompt=True to accept any size divisible "
                f"by {self.total_stride}"
            )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six encoder feature maps; compute once and ``decode`` for several tasks."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, skips: Sequence[torch.Tensor], task=None) -> torch.Tensor | list[torch.Tensor]:
        """Prompt the bottleneck for ``task`` and run the decoder (see the class docstring for outputs)."""
        return self.decode_ids(skips, self.task_ids(task, skips[-1].shape[0], skips[-1].device))

    def decode_ids(self, skips: Sequence[torch.Tensor], task_ids: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``decode`` with a (B,) LongTensor of valid ids and no checks (traceable, e.g. for ONNX export)."""
        bottleneck = skips[-1]
        prompted = torch.cat([bottleneck, self.prompt(bottleneck, task_ids)], 1)
        return self.decoder([*skips[:-1], prompted])

    def decode_tasks(self, skips: Sequence[torch.Tensor], tasks: Sequence) -> list[torch.Tensor]:
        """``[decode(skips, t) for t in tasks]``, sharing what does not depend on the task: on the CPU fast path in
        eval mode each decoder level's skip term (``UNetDecoder.skip_terms``, a third of the decoder's FLOPs) is
        computed once for all tasks. The results equal ``decode``'s within float32 tolerance."""
        if len(tasks) < 2 or not self.decoder.can_share_skip_terms(skips):
            return [self.decode(skips, t) for t in tasks]
        bottleneck = skips[-1]
        terms = self.decoder.skip_terms(skips)
        outputs = []
        for task in tasks:
            ids = self.task_ids(task, bottleneck.shape[0], bottleneck.device)
            prompted = torch.cat([bottleneck, self.prompt(bottleneck, ids)], 1)
            outputs.append(self.decoder.forward_with_skip_terms(prompted, terms))
        return outputs

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor | list[torch.Tensor]:
        return self.decode(self.encode(x), task)


class UniSegBackbone(nn.Module):
    """The downstream network the paper fine-tunes: UniSeg's encoder and decoder without prompt, N-class heads.

    Args:
        num_classes: output classes including background (14 for BTCV, 2 for VS).
        in_channels, features, kernel_sizes, strides: as for ``UniSeg``.
        deep_supervision: in training mode return the logits of all five decoder levels.

    ``forward(x)`` takes (B, C, *size) with any size divisible by the total stride (32, 32, 16) and returns
    (B, num_classes, *size) logits in eval mode, the five deep-supervision levels (full resolution first) in
    training mode. The first transposed conv has no prompt channel (320 -> 320).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: Sequence[int] = IN_CHANNELS,
        features: Sequence[int] = FEATURES,
        kernel_sizes: Sequence[Triple] = KERNEL_SIZES,
        strides: Sequence[Triple] = STRIDES,
        deep_supervision: bool = True,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config = {
            "num_classes": num_classes, "in_channels": list(in_channels), "features": list(features),
            "kernel_sizes": [list(k) for k in kernel_sizes], "strides": [list(s) for s in strides],
        }
        self.total_stride = total_stride(strides)
        self.encoder = UniSegEncoder(in_channels, features, kernel_sizes, strides)
        self.decoder = UNetDecoder(features, kernel_sizes, strides, num_classes, 0, deep_supervision)
        self.apply(init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5:
            raise InputShapeError(f"expected a (B, C, x, y, z) tensor, got shape {tuple(x.shape)}")
        _check_divisible(x.shape[2:], self.total_stride)
        return self.decoder(self.encoder(x))
