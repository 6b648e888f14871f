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
    (evaluation: every case is scored exactly once, and the metrics are gathered across ranks; the same split as
    ``uniseg-hub predict`` under torchrun, ``pipeline.cases.shard_cases``).
    """
    if not (dist.is_available() and dist.is_initialized()) or not data:
        return list(data)
    world = dist.get_world_size()
    if len(data) < world:
        raise TrainingError(
            f"{len(data)} case(s) cannot be shared by {world} processes (one would get none and hang the gathering "
            f"of gradients or metrics); run with at most {len(data)} processes (torchrun --nproc_per_node)"
        )
    if not even_divisible and not shuffle:  # evaluation: the split `uniseg-hub predict` makes of a cohort
        from ..pipeline.cases import shard_cases

        return shard_cases(data, rank(), world)
    parts = partition_dataset(data, num_partitions=world, shuffle=shuffle, seed=seed, even_divisible=even_divisible)
    return parts[rank()]


def world_size() -> int:
    """Number of processes under ``torchrun`` (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def iterations_per_rank(iterations_per_epoch: int) -> int:
    """This rank's share of an epoch's iterations: ``ceil(iterations_per_epoch / world_size)``.

    Every rank trains ``batch_size`` patches per iteration, so an epoch sees ``iterations_per_epoch x batch_size``
    patches (rounded up to a multiple of the ranks) whatever the number of GPUs: the official 250 x 2 = 500 per
    epoch. With N ranks the optimizer takes N times fewer steps per epoch, each on an N times larger global batch
    (``N x batch_size``), at the same learning rate and the same per-epoch schedule.
    """
    if isinstance(iterations_per_epoch, bool) or not isinstance(iterations_per_epoch, int) or iterations_per_epoch < 1:
        raise TrainingError(f"iterations_per_epoch must be a positive whole number, got {iterations_per_epoch!r}")
    return -(-iterations_per_epoch // world_size())


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
