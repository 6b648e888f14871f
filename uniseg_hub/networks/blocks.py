"""Building blocks of the UniSeg networks: conv + instance norm + LeakyReLU, the multi-channel input stem.

Plain ``torch.nn`` with the module names and state-dict keys of MONAI's ``Convolution`` block, so that importing
the networks does not import MONAI (seconds) and converted checkpoints load by key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputShapeError

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
    ``torch.nn`` alone so that importing the network does not import MONAI (seconds).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Triple, stride: Triple = (1, 1, 1)):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, tuple(kernel_size), tuple(stride),
                              padding=same_padding(kernel_size, stride), bias=True)
        self.adn = nn.Sequential(OrderedDict(N=nn.InstanceNorm3d(out_channels, affine=True),
                                             A=nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adn(self.conv(x))


def init_he(module: nn.Module) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)``: Kaiming-normal conv and transposed-conv weights, zero biases.

    Apply with ``net.apply(init_he)``; the prompt keeps its N(0, 1) initialisation, as in the official model.
    """
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)) and not module.weight.is_meta:  # meta: no values
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_divisible(spatial: Sequence[int], stride: Sequence[int]) -> None:
    if any(n % s for n, s in zip(spatial, stride)):
        raise InputShapeError(
            f"input size {tuple(spatial)} is not divisible by the network's total stride {tuple(stride)}; "
            "pad or crop the image, or use sliding-window inference with the model's patch size"
        )


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
        return self.act(self.norm(self.convs[key](x)))
