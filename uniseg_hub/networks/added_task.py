"""What a task added to a trained universal model owns, so that the original tasks' computation stays untouched."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import ConvBlock, Triple


class AddedTask(nn.Module):
    """A task added after training (``uniseg-hub add-task``): its prompt channel, decoder adapters and heads.

    Args:
        hidden_channels: width of the prompt fusion's hidden features (``TaskPrompt.hidden_channels``).
        kernel_size: kernel of the fusion convs (the bottleneck kernel).
        level_channels: the decoder's feature channels per level, deepest first (``UNetDecoder.level_channels``).
        num_classes: the task's classes, background included.

    The official tasks' prompt is the fusion's last block, one output channel per task over the shared hidden
    features; ``prompt`` is one more such channel, computed from the same hidden features by a block of its own.
    At every decoder level the features pass through ``x + adapter(x)`` (a 1x1x1 conv, zero at the start so the
    task begins as the decoder it extends), then the task's own head. None of these modules is used by another
    task, so training only them cannot change the original tasks' logits.
    """

    def __init__(self, hidden_channels: int, kernel_size: Triple, level_channels: Sequence[int], num_classes: int):
        super().__init__()
        self.prompt = ConvBlock(hidden_channels, 1, kernel_size)
        self.adapters = nn.ModuleList(nn.Conv3d(c, c, 1) for c in level_channels)
        self.heads = nn.ModuleList(nn.Conv3d(c, num_classes, 1, bias=False) for c in level_channels)
        self.reset_adapters()

    @property
    def num_classes(self) -> int:
        return self.heads[-1].out_channels

    def reset_adapters(self) -> None:
        """Zero every adapter: the decoder's features pass unchanged."""
        for adapter in self.adapters:
            nn.init.zeros_(adapter.weight)
            nn.init.zeros_(adapter.bias)

    def adapt(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Level ``level``'s features (B, C, *S) after the task's residual adapter."""
        return x + self.adapters[level](x)
