"""Core room (sharding): FSDP2 parameters (DTensors) seen by their local shards, and the statistics the criteria need
from all shards (all-reduced sums and histograms, tie counts), so masks equal one process's without gathering a layer.

Supported layout: what ``torch.distributed.fsdp.fully_shard`` makes by default, each parameter a ``DTensor`` sharded
on dim 0 (``Shard(0)``) over a 1-D device mesh; a rank's shard is then one contiguous run of the flat tensor, and
shards follow each other in mesh order. Plain tensors pass through every function here unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from magprune.pruner import Pruner

_MASKS_PREFIX = "pruner.masks."


_PLAIN = frozenset({torch.Tensor, nn.Parameter})


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter, its gradient, optimizer state or mask)."""
    # The gradient hook asks this at every step: a type test, no import (a DTensor exists only once imported); plain
    # tensors first (the isinstance test against DTensor took 2-4 us inside a LeNet-300-100 step)
    if type(tensor) in _PLAIN:
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (sharing its storage, so in-place writes land in it); a plain tensor as is."""
    if not is_sharded(tensor):
        return tensor
    _check_layout(tensor)
    return tensor.to_local()


def _check_layout(tensor: Tensor) -> None:
    from torch.distributed.tensor import Shard

    placements = tuple(tensor.placements)
    if tensor.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            f"magprune prunes DTensors sharded on dim 0 over a 1-D device mesh (fully_shard's default), got "
            f"placements {placements} on a {tensor.device_mesh.ndim}-D mesh")


def mesh_of(tensors: Sequence[Tensor]) -> DeviceMesh | None:
    """The device mesh ``tensors`` are sharded over, or None if none is sharded; mixing plain and sharded tensors,
    or meshes, raises ValueError (a ranking over them would count the plain ones once per rank)."""
    sharded = [is_sharded(t) for t in tensors]
    if not any(sharded):
        return None
    if not all(sharded):
        raise ValueError("cannot rank sharded (DTensor) and plain tensors together: shard every layer pruned by "
                         "one criterion with fully_shard, or prune them by separate criteria")
    mesh = tensors[0].device_mesh
    for tensor in tensors:
        _check_layout(tensor)
        if tensor.device_mesh != mesh:
            raise ValueError(f"tensors ranked together must share one device mesh, got {mesh} and "
                             f"{tensor.device_mesh}")
    return mesh


def all_reduce_sum_(tensor: Tensor, mesh: DeviceMesh | None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``mesh``, in place (nothing to do for None); moved to the mesh's device for
    the collective (NCCL reduces only GPU tensors) and back."""
    if mesh is None or mesh.size() == 1:
        return tensor
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    work = tensor.to(device)
    torch.distributed.all_reduce(work, group=mesh.get_group())
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def sum_over_shards(values: Sequence[float], tensor: Tensor) -> list[float]:
    """Element-wise sums of per-shard ``values`` over the shards of ``tensor`` (as is for a plain tensor), float64."""
    mesh = mesh_of([tensor])
    if mesh is None:
        return list(values)
    return all_reduce_sum_(torch.tensor(list(values), dtype=torch.float64), mesh).tolist()


def count_nonzero(tensor: Tensor) -> int:
    """Nonzero (true) entries of the whole tensor: the local count summed over the shards."""
    count = int(torch.count_nonzero(local(tensor)))
    return int(sum_over_shards([count], tensor)[0]) if is_sharded(tensor) else count


def tie_budgets(tensors: Sequence[Tensor], local_ties: Sequence[int], ties_to_prune: int) -> list[int]:
    """How many of its ``local_ties`` entries this rank prunes in each tensor so that, over all ranks, exactly the
    first ``ties_to_prune`` ties in global order are pruned: earlier tensor first, then lower flat index (shards of
    dim 0 follow each other in mesh order), as one process breaks ties."""
    mesh = mesh_of(tensors)
    if mesh is None:
        raise ValueError("tie_budgets is for sharded tensors; one process counts its ties in one pass")
    counts = torch.zeros(mesh.size(), len(tensors), dtype=torch.int64)
    counts[mesh.get_local_rank()] = torch.tensor(list(local_ties), dtype=torch.int64)
    all_reduce_sum_(counts, mesh)  # rows: mesh coordinates; each rank filled its own
    before = counts.sum(0).cumsum(0) - counts.sum(0) + counts[:mesh.get_local_rank()].sum(0)
    return [max(0, min(int(ties), ties_to_prune - int(b))) for ties, b in zip(local_ties, before, strict=True)]


def like(local_mask: Tensor, template: Tensor) -> Tensor:
    """``local_mask`` (this rank's part) as a tensor laid out like ``template``: a DTensor with its mesh and
    placements if ``template`` is one, else as is."""
    if not is_sharded(template):
        return local_mask
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_mask, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def match(mask: Tensor, param: Tensor) -> Tensor:
    """``mask`` laid out like ``param``: a whole (plain) mask of a sharded parameter is cut to this rank's shard
    locally (no communication: every rank holds the same whole mask), a DTensor mask is redistributed to the
    parameter's placements, and a DTensor mask of a plain parameter is gathered whole."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        if is_sharded(mask):
            if tuple(mask.placements) == tuple(param.placements) and mask.device_mesh == param.device_mesh:
                return mask
            return mask.redistribute(param.device_mesh, param.placements)
        return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    if is_sharded(mask):
        return mask.full_tensor()
    return mask


def problems_over_ranks(problems: list[str], tensors: Sequence[Tensor]) -> list[str]:
    """Every rank's ``problems`` (each prefixed with its rank) on every rank, if ``tensors`` are sharded; a check
    over shards must fail on all ranks together, or the ranks that pass would wait for the others forever."""
    sharded = [t for t in tensors if is_sharded(t)]
    if not sharded:
        return problems
    import torch.distributed as dist

    group = sharded[0].device_mesh.get_group()
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problems, group=group)
    return [f"rank {dist.get_global_rank(group, index)}: {problem}"
            for index, found in enumerate(gathered) for problem in found]


# ---------------------------------------------------------------- whole state and checkpoints
def full_state_dict(model: nn.Module, pruner: Pruner) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The plain, unsharded ``(model state_dict, masks)`` on CPU, as ``shrink``, ``save_compressed`` and
    ``sparsify`` take them, on rank 0 (empty dicts on the other ranks). Collective: call it on every rank.

    Layers are gathered one at a time; rank 0 ends up holding the whole model once, the others nothing."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    main = not dist.is_initialized() or dist.get_rank() == 0
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    masks = {}
    for name, mask in pruner.masks.items():
        whole = mask.full_tensor() if is_sharded(mask) else mask
        if main:
            masks[name] = whole.cpu()
    return (state, masks) if main else ({}, {})


def save_sharded(checkpoint_dir: str | Path, model: nn.Module, pruner: Pruner,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save the model's, the optimizer's and the pruner's sharded state with ``torch.distributed.checkpoint``: every
    rank writes its own shards (masks beside the weights they belong to). Collective: call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model), "pruner": pruner.state_dict()}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(checkpoint_dir))


def load_sharded(checkpoint_dir: str | Path, model: nn.Module, pruner: Pruner,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what :func:`save_sharded` wrote into ``model``, ``pruner`` (and ``optimizer``), each rank reading its
    own shards; the pruned weights are zeroed and attached optimizers cleaned. Collective: call it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    reader = dcp.FileSystemReader(str(checkpoint_dir))
    saved = reader.read_metadata().state_dict_metadata
    names = [key[len(_MASKS_PREFIX):] for key in saved if key.startswith(_MASKS_PREFIX)]
    unknown = sorted(set(names) - set(pruner.params))
    if unknown:
        raise ValueError(f"checkpoint {checkpoint_dir} has masks for {unknown}, which are not targets of this "
                         f"pruner; targets: {sorted(pruner.params)}")
    templates = {name: like(torch.ones(local(pruner.params[name]).shape, dtype=torch.bool,
                                       device=pruner.params[name].device), pruner.params[name]) for name in names}
    state: dict[str, Any] = {"model": get_model_state_dict(model), "pruner": {"version": 0, "masks": templates}}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, storage_reader=reader)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    pruner.load_state_dict(state["pruner"])
