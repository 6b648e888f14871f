"""UniSeg's task prompt: the universal prompt fused with the bottleneck into one map per task."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, Triple


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

    @property
    def hidden_channels(self) -> int:
        """Width of the fusion's hidden features, the input of its last block (and of an added task's prompt)."""
        return self.fusion[-1].conv.in_channels

    def hidden(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """The fusion's hidden features (B, hidden_channels, *S): all but its last block, shared by every task."""
        prompt = self.universal
        if prompt.shape[2:] != bottleneck.shape[2:]:
            prompt = F.interpolate(prompt, size=bottleneck.shape[2:], mode="trilinear", align_corners=False)
        batch = bottleneck.shape[0]
        return self.fusion[:-1](torch.cat([bottleneck, prompt.expand(batch, -1, -1, -1, -1).to(bottleneck.dtype)], 1))

    def forward(self, bottleneck: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        fused = self.fusion[-1](self.hidden(bottleneck))
        index = task_ids.view(-1, 1, 1, 1, 1).expand(bottleneck.shape[0], 1, *fused.shape[2:])
        return fused.gather(1, index)
