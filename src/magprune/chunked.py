"""Core room (chunked passes): work over large tensors chunk by chunk, so that no temporary as large as a layer
(a float copy of a mask, ``~mask``, a boolean index) is ever made: pruning a VGG-16 needs about the masks' memory."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from magprune.sharding import local

CHUNK = 1 << 18  # elements per temporary chunk (1 MB of fp32)


def chunks(tensor: Tensor, *masks: Tensor | None) -> Iterator[tuple]:
    """``(start, part, *mask_parts)``: matching flat chunks of ``tensor`` and each of ``masks`` (None stays None), at
    most CHUNK entries each, ``start`` the flat offset of the chunk. The parts are views, so writes land in
    ``tensor``; a non-contiguous ``tensor`` comes as one whole part in its own shape (start 0). Sharded tensors
    (DTensors) are read by their local shards, ``start`` counting within the shard."""
    tensor, masks = local(tensor), tuple(None if m is None else local(m) for m in masks)
    if not tensor.is_contiguous():
        yield (0, tensor, *masks)
        return
    flat = tensor.view(-1)
    flat_masks = [None if m is None else m.reshape(-1) for m in masks]
    for start in range(0, flat.numel(), CHUNK):
        stop = start + CHUNK
        yield (start, flat[start:stop], *(None if m is None else m[start:stop] for m in flat_masks))


def count_dropped_nonzero(tensor: Tensor, keep: Tensor) -> int:
    """Entries of ``tensor`` that are nonzero where ``keep`` is false (boolean indexing of a whole VGG-16 made
    1.6 GB of temporaries)."""
    return sum(int(((part != 0) & ~part_keep).count_nonzero()) for _, part, part_keep in chunks(tensor, keep))


def all_finite(tensor: Tensor) -> bool:
    return all(bool(torch.isfinite(part).all()) for _, part in chunks(tensor))


def fill_dropped(tensor: Tensor, keep: Tensor, value: float, old: Tensor | None = None) -> None:
    """``tensor[old & ~keep] = value`` (``old`` defaults to all-true), in place."""
    for _, part, part_keep, part_old in chunks(tensor, keep, old):
        dropped = ~part_keep
        if part_old is not None:
            dropped &= part_old
        part.masked_fill_(dropped, value)
