"""The nnU-Net v1 decoder UniSeg uses: transposed conv, skip concatenation, two conv blocks, one head per level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBlock, Triple


class UNetDecoder(nn.Module):
    """nnU-Net v1 decoder: per level a transposed conv, skip concatenation, two conv blocks and a 1x1x1 head.

    Args:
        features, kernel_sizes, strides: the encoder's per-stage lists; level ``u`` (0 = deepest) upsamples stage
            ``n-1-u`` with kernel = stride = ``strides[n-1-u]`` and uses ``kernel_sizes[n-1-u]`` for its convs.
        head_channels: output channels of every head.
        bottleneck_extra: extra channels appended to the bottleneck before the first level (1 for the task prompt).
        deep_supervision: in training mode return the outputs of all levels.

    ``forward(skips, added=None)`` takes the encoder's six maps (bottleneck last) and returns the full-resolution
    logits (B, head_channels, *input size) in eval mode, and in training mode (with deep supervision) the list of all
    levels' logits, full resolution first, then each coarser level (five in the official model). With ``added`` (an
    ``AddedTask``) each level's features also pass through the task's residual adapter and its heads replace the
    shared ones.
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

    @property
    def level_channels(self) -> list[int]:
        """Feature channels of each level's output, deepest first (what a head or an adapter takes)."""
        return [head.in_channels for head in self.heads]

    def forward(self, skips: Sequence[torch.Tensor], added: nn.Module | None = None) \
            -> torch.Tensor | list[torch.Tensor]:
        all_levels = self.training and self.deep_supervision
        heads = self.heads if added is None else added.heads
        x = skips[-1]
        outputs = []
        for u, (up, block, head) in enumerate(zip(self.upsamples, self.blocks, heads)):
            x = block(torch.cat([up(x), skips[-(u + 2)]], 1))
            if added is not None:
                x = added.adapt(u, x)
            if all_levels or u == len(heads) - 1:
                outputs.append(head(x))
        return outputs[::-1] if all_levels else outputs[-1]
