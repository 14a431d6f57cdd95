"""Distributed room: PyTorch's own DDP or FSDP2 under ``torchrun`` (gloo on CPU, NCCL on GPU), and what the pipeline
needs from it: rank and world size, the device, sharded models and batches, whole copies, metrics summed over ranks."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from magprune import sharding
from magprune.experiment.config import ConfigError
from magprune.targets import layer_weights


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
    ``DistributedSampler`` splits the dataset (rank r takes positions r, r + W, ...), without its padding. Shards
    of a batch that does not split evenly differ by one example; :func:`loss_scale` makes their gradients add up to
    the single-process gradient all the same.
    """
    return indices[rank()::world_size()] if is_distributed() else indices


def loss_scale(shard_size: int, batch_size: int) -> float:
    """Factor for this rank's mean loss over its ``shard_size`` examples of a global batch of ``batch_size``, so
    that DDP's gradient average over ranks is exactly the gradient of the global batch's mean loss, also when the
    shards are unequal (the last batch of an epoch): ``shard_size * world_size / batch_size`` (1.0 alone)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return shard_size * world_size() / batch_size


def check_batch_size(batch_size: int, examples: int | None = None) -> None:
    """Refuse a batch size that does not split evenly over the ranks, or (given the number of training examples)
    that leaves a last batch smaller than the number of ranks: some rank would get no example at all."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(f"train.batch_size must be divisible by the number of processes ({world}) so every rank "
                         f"gets an equal share of each global batch, got {batch_size}")
    last = examples % batch_size if examples else 0
    if 0 < last < world:
        raise ConfigError(f"train.batch_size={batch_size} leaves a last batch of {last} of the {examples} training "
                          f"examples, fewer than the {world} processes: a rank would get an empty batch. Choose a "
                          f"batch size for which {examples} % batch_size is 0 or at least {world}")


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2: ``fully_shard`` on every prunable layer, then on the root (the usual
    FSDP2 layout: a layer's weights are gathered just for its forward and backward)."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if module is not model and layer_weights(module):
            fully_shard(module)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded (FSDP2): then DDP must not wrap it."""
    return any(sharding.is_sharded(p) for p in model.parameters())


def whole_copy(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """``model`` itself, or for a sharded one a plain copy with the whole weights on every rank (``build`` makes an
    empty model of the same architecture): what the report, the histograms and the saved files read. Collective."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    copy = build()
    copy.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    return copy.to(device())


def whole_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The masks whole on every rank (sharded ones gathered). Collective."""
    return {name: mask.full_tensor() if sharding.is_sharded(mask) else mask for name, mask in masks.items()}


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
