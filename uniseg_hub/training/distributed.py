"""Distributed helpers for ``torchrun``: this process's rank, its shard of a datalist, the unwrapped network."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from monai.data import partition_dataset
from torch import nn

from ..errors import TrainingError

logger = logging.getLogger("uniseg_hub.training")


def rank() -> int:
    """This process's rank under ``torchrun`` (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def log_main(message: str) -> None:
    """Log ``message`` (INFO, logger ``uniseg_hub.training``) on the main process only; the bundle's logging.conf
    sends it to the console, and library users configure it as any logger."""
    if is_main_process():
        logger.info(message)


def shard(data: Sequence, even_divisible: bool = False, shuffle: bool = False, seed: int = 0) -> list:
    """This rank's part of ``data`` (all of it when not distributed).

    ``even_divisible`` repeats items so every rank gets as many (training); otherwise ranks may differ by one item
    (evaluation: every case is scored exactly once, and the metrics are gathered across ranks).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return list(data)
    world = dist.get_world_size()
    if len(data) < world:
        raise TrainingError(
            f"{len(data)} case(s) cannot be shared by {world} processes (one would get none and hang the gathering "
            f"of gradients or metrics); run with at most {len(data)} processes (torchrun --nproc_per_node)"
        )
    parts = partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=even_divisible)
    return parts[rank()]


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or the network itself)."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def all_mean(total: float, count: int, device) -> float:
    """Mean of per-rank sums over all ranks."""
    if dist.is_available() and dist.is_initialized():
        values = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        total, count = values.tolist()
    return total / max(count, 1)
