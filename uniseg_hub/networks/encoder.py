"""The six-stage UniSeg encoder, a pretrained backbone on its own (timm-style ``feature_info``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import FEATURES, IN_CHANNELS, KERNEL_SIZES, STRIDES, total_stride
from .blocks import ConvBlock, FeatureInfo, MultiChannelStem, Triple, init_he


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
