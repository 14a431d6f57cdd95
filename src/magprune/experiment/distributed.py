"""Distributed room: PyTorch's own DDP under ``torchrun`` (gloo on CPU, NCCL on GPU), and what the pipeline needs
from it: rank and world size, the device, sharded batches and metrics summed over ranks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from magprune.experiment.config import ConfigError


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes in the environment (WORLD_SIZE > 1); True if distributed.

    The backend is NCCL when CUDA is available, gloo otherwise. A single process (no torchrun) stays alone.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(indices: Tensor) -> Tensor:
    """This rank's part of a global batch: every world_size-th index, starting at the rank.

    Every rank draws the same permutation (same seeded generator), so a global batch is split the way
    ``DistributedSampler`` splits the dataset (rank r takes positions r, r + W, ...), without its padding: with
    equal shards, the mean of the ranks' mean losses is the global batch's mean loss, and DDP's gradient
    average is the single-process gradient.
    """
    return indices[rank()::world_size()] if is_distributed() else indices


def check_batch_size(batch_size: int) -> None:
    world = world_size()
    if batch_size % world:
        raise ConfigError(f"train.batch_size must be divisible by the number of processes ({world}) so every rank "
                         f"gets an equal share of each global batch, got {batch_size}")


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
