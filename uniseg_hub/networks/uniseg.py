"""The universal UniSeg model and the downstream backbone the paper fine-tunes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import UniSegConfig
from ..errors import ConfigError, InputShapeError, UnknownTaskError
from ..tasks import OFFICIAL_TASKS, TaskTable
from .added_task import AddedTask
from .blocks import check_divisible, init_he
from .decoder import UNetDecoder
from .encoder import UniSegEncoder
from .prompt import TaskPrompt


def _config(config: UniSegConfig | None, architecture: str, fields: dict) -> UniSegConfig:
    """The configuration a network is built from: ``config``, or one parsed from keyword fields."""
    if config is None:
        return UniSegConfig(architecture=architecture, **fields)
    if fields:
        raise TypeError(f"pass either a UniSegConfig or architecture fields, not both ({', '.join(fields)})")
    if not isinstance(config, UniSegConfig) or config.architecture != architecture:
        raise ConfigError(f"expected a UniSegConfig of a {architecture}, got {config!r}")
    return config


class UniSeg(nn.Module):
    """The universal UniSeg model: encoder, task prompt, decoder with one shared head.

    Args:
        config: the architecture (``UniSegConfig``, default the official model); or give its fields as keywords
            (``UniSeg(features=..., patch_size=...)``): in_channels (stems, 1/2/4), features, kernel_sizes, strides
            (per stage, MONAI axis order), num_tasks (T, prompt channels), head_channels (4: task ``t`` uses its first
            C_t) and patch_size (the training patch (192, 192, 64), which fixes the prompt's size).
        resize_prompt: accept other sizes divisible by the total stride by resizing the prompt trilinearly to the
            bottleneck. A deviation from the official model, which accepts the training patch only (default off).
        deep_supervision: in training mode return the logits of all five decoder levels.
        default_task: task used when ``forward`` gets none (lets ``net(x)`` work, e.g. for MONAI's checks).
        tasks: the model's task table (names, labels, spacing), one task per id; default the official eleven when
            the model has eleven tasks, else none (tasks are then addressed by id).

    Tasks ``0 .. config.num_tasks - 1`` are prompted through the shared fusion and share the head; tasks added after
    training (``config.added_tasks``) follow, each with its own ``AddedTask`` modules in ``added``, and leave the
    prompted tasks' computation untouched.

    ``forward(x, task)``: ``x`` is (B, C, *patch_size) with C in ``in_channels``; ``task`` is a task id, a task name
    (``"liver"``; needs a task table) or a LongTensor (B,) of ids for a mixed-task batch (each sample gets its own
    prompt; a single-task batch gives exactly the official result; added tasks take single-task batches). Returns
    the full-resolution logits (B, output_channels(task), *patch_size) in eval mode; in training mode with deep
    supervision a list of five logits, full resolution first. A prompted task's logits cover all ``head_channels``;
    the official inference takes the softmax over all of them and keeps the task's first C_t channels
    (``tasks.get_task(t).num_classes``). An added task's logits are its C_t classes.
    """

    def __init__(self, config: UniSegConfig | None = None, *, resize_prompt: bool = False,
                 deep_supervision: bool = True, default_task: int | str = 0, tasks: TaskTable | None = None,
                 **fields):
        super().__init__()
        self.config = c = _config(config, "UniSeg", fields)
        self.patch_size = c.patch_size
        self.total_stride = c.total_stride
        self.resize_prompt = resize_prompt
        self.prompted_tasks = c.num_tasks
        self.num_tasks = c.total_tasks
        if tasks is None and self.num_tasks == len(OFFICIAL_TASKS):
            tasks = OFFICIAL_TASKS
        if tasks is not None and len(tasks) != self.num_tasks:
            raise ConfigError(f"the task table lists {len(tasks)} tasks ({tasks.describe()}), the network has "
                              f"{self.num_tasks}: {c.num_tasks} prompted + {len(c.added_tasks)} added")
        self.tasks = tasks
        self.encoder = UniSegEncoder(c.in_channels, c.features, c.kernel_sizes, c.strides)
        self.prompt = TaskPrompt(c.features[-1], c.num_tasks, c.prompt_size, c.kernel_sizes[-1])
        self.decoder = UNetDecoder(c.features, c.kernel_sizes, c.strides, c.head_channels, 1, deep_supervision)
        self.added = nn.ModuleList(
            AddedTask(self.prompt.hidden_channels, c.kernel_sizes[-1], self.decoder.level_channels, classes)
            for classes in c.added_tasks)
        self.default_task = self.task_index(default_task)
        self.apply(init_he)
        for added in self.added:
            added.reset_adapters()

    def task_index(self, task: int | str) -> int:
        """Resolve a task id or name to the task's id, with an error that lists the valid tasks."""
        if isinstance(task, str) and not task.strip().isdigit():
            if self.tasks is None:
                raise UnknownTaskError(
                    f"this model has {self.num_tasks} tasks and no task table to look names up in: pass an id "
                    f"from 0 to {self.num_tasks - 1}"
                )
            return self.tasks.get(task).id
        index = int(task)
        if not 0 <= index < self.num_tasks:
            names = f" ({self.tasks.describe()})" if self.tasks is not None else ""
            raise UnknownTaskError(f"task id {index} is out of range: this model has tasks 0-{self.num_tasks - 1}"
                                   + names)
        return index

    def output_channels(self, task: int | str) -> int:
        """Channels of ``task``'s logits: ``head_channels`` for a prompted task, its classes for an added one."""
        index = self.task_index(task)
        if index < self.prompted_tasks:
            return self.config.head_channels
        return self.added[index - self.prompted_tasks].num_classes

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
            check_divisible(spatial, self.total_stride)
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
        """``decode`` with a (B,) LongTensor of valid ids; without added tasks no checks (traceable, e.g. for ONNX
        export)."""
        bottleneck = skips[-1]
        if len(self.added):
            first = int(task_ids[0])
            if first >= self.prompted_tasks or bool((task_ids >= self.prompted_tasks).any()):
                if bool((task_ids != first).any()):
                    raise UnknownTaskError(f"a batch with an added task must hold one task only, got ids "
                                           f"{task_ids.tolist()}; decode the tasks one at a time")
                added = self.added[first - self.prompted_tasks]
                prompt = added.prompt(self.prompt.hidden(bottleneck))
                return self.decoder([*skips[:-1], torch.cat([bottleneck, prompt], 1)], added)
        prompted = torch.cat([bottleneck, self.prompt(bottleneck, task_ids)], 1)
        return self.decoder([*skips[:-1], prompted])

    def decode_tasks(self, skips: Sequence[torch.Tensor], tasks: Sequence) -> list[torch.Tensor]:
        """``[decode(skips, t) for t in tasks]``: the encoder's maps computed once, decoded for several tasks."""
        return [self.decode(skips, t) for t in tasks]

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor | list[torch.Tensor]:
        return self.decode(self.encode(x), task)


class UniSegBackbone(nn.Module):
    """The downstream network the paper fine-tunes: UniSeg's encoder and decoder without prompt, N-class heads.

    Args:
        num_classes: output classes including background (14 for BTCV, 2 for VS); or None with ``config``.
        config: the architecture (a ``UniSegConfig`` of a ``UniSegBackbone``); or give in_channels, features,
            kernel_sizes and strides as keywords, as for ``UniSeg``.
        deep_supervision: in training mode return the logits of all five decoder levels.

    ``forward(x)`` takes (B, C, *size) with any size divisible by the total stride (32, 32, 16) and returns
    (B, num_classes, *size) logits in eval mode, the five deep-supervision levels (full resolution first) in
    training mode. The first transposed conv has no prompt channel (320 -> 320).
    """

    def __init__(self, num_classes: int | None = None, config: UniSegConfig | None = None, *,
                 deep_supervision: bool = True, **fields):
        super().__init__()
        if num_classes is not None:
            fields["num_classes"] = num_classes
        self.config = c = _config(config, "UniSegBackbone", fields)
        self.total_stride = c.total_stride
        self.encoder = UniSegEncoder(c.in_channels, c.features, c.kernel_sizes, c.strides)
        self.decoder = UNetDecoder(c.features, c.kernel_sizes, c.strides, c.num_classes, 0, deep_supervision)
        self.apply(init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 5:
            raise InputShapeError(f"expected a (B, C, x, y, z) tensor, got shape {tuple(x.shape)}")
        check_divisible(x.shape[2:], self.total_stride)
        return self.decoder(self.encoder(x))
