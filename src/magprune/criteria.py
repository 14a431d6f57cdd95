"""Criteria room: weights in, boolean keep-masks out (Han's q x std rule, per-layer and global magnitude sparsity).

A criterion is a callable ``criterion(weights, masks) -> {name: keep_mask}`` taking the weights to prune and the
current keep-masks by parameter name (a name absent from ``masks`` has nothing pruned yet). Layer names given by
the user may be module names (``"fc1"``) or parameter names (``"fc1.weight"``).

Everything here works chunk by chunk, so no all-weights (or even whole-layer) fp32 copy is ever made: thresholds
come from an exact two-pass radix selection on the float bit patterns of |w|, and the extra memory stays at the
boolean masks plus a few MB of temporaries, whatever the model size.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from magprune import chunked, sharding

# Han et al. 2015, Tables 2-3: fraction of weights kept per layer, keyed by the module names of magprune's models.
HAN2015_DENSITIES: dict[str, dict[str, float]] = {
    "lenet-300-100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
    "lenet-5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
    # AlexNet's Table 4 calls fc6..fc8 "fc1..fc3"; magprune's AlexNet keeps Caffe's names.
    "alexnet": {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
                "fc6": 0.09, "fc7": 0.09, "fc8": 0.25},
    "vgg-16": {"conv1_1": 0.58, "conv1_2": 0.22, "conv2_1": 0.34, "conv2_2": 0.36, "conv3_1": 0.53,
               "conv3_2": 0.24, "conv3_3": 0.42, "conv4_1": 0.32, "conv4_2": 0.27, "conv4_3": 0.34,
               "conv5_1": 0.35, "conv5_2": 0.29, "conv5_3": 0.36, "fc6": 0.04, "fc7": 0.04, "fc8": 0.23},
}


def resolve_layer_names(keys: Iterable[str], names: Iterable[str], argument: str) -> dict[str, str]:
    """Map user-given layer keys (module or parameter names) to parameter names; unknown keys raise ValueError."""
    names = list(names)
    resolved = {}
    for key in keys:
        for candidate in (key, f"{key}.weight"):
            if candidate in names:
                resolved[key] = candidate
                break
        else:
            raise ValueError(f"{argument}: unknown layer {key!r}; allowed: {names}")
    return resolved


def check_sparsity(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{argument} must be a sparsity (fraction of weights pruned) in [0, 1), got {value!r}")
    return float(value)


def check_quality(value: object, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument} must be a finite quality parameter q >= 0 (threshold = q x std), "
                         f"got {value!r}")
    return float(value)


def _require_weights(weights: Mapping[str, Tensor]) -> None:
    if not weights:
        raise ValueError("weights is empty: nothing to prune")


def require_finite(weights: Mapping[str, Tensor], names: Iterable[str]) -> None:
    """Raise ValueError naming the first of ``names`` whose weights hold a NaN or an infinity."""
    for name in names:
        if not chunked.all_finite(weights[name].detach()):
            raise ValueError(f"{name}: weights contain NaN or infinity; cannot rank them by magnitude to prune")


def _flat_chunks(tensor: Tensor) -> Iterable[tuple[int, Tensor]]:
    """(start, part) over ``tensor`` read flat (a non-contiguous tensor is read from a flat copy; a sharded one by
    its local shard)."""
    return chunked.chunks(sharding.local(tensor.detach()).reshape(-1))


def _magnitude_bits(chunk: Tensor) -> Tensor:
    # For non-negative floats the int32 bit pattern orders exactly like the value, so selection can count integers.
    return chunk.abs().to(torch.float32).view(torch.int32)


def kth_smallest_magnitude(tensors: list[Tensor], k: int) -> tuple[int, int]:
    """Exact k-th smallest |x| (1-based) over several tensors, by two 16-bit radix passes of histogram counting.

    Returns ``(bits, below)``: the float32 bit pattern of that magnitude and how many entries lie strictly below
    it. Memory is one chunk's temporaries, whatever the tensors' size. Over sharded tensors (FSDP2) both histograms
    are summed over the shards, so every rank gets the answer for the whole tensors.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    mesh = sharding.mesh_of(tensors)
    if total <= chunked.CHUNK and mesh is None:
        # Small enough for one temporary: kthvalue beats two 65,536-bin histograms (models with many small layers).
        flat = torch.cat([_magnitude_bits(t.reshape(-1)).view(torch.float32) for t in tensors])
        if not torch.isfinite(flat).all():
            raise ValueError("weights contain NaN or infinity; cannot rank them by magnitude")
        value = flat.kthvalue(k).values
        return int(value.view(torch.int32)), int((flat < value).count_nonzero())
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for tensor in tensors:
        for _, chunk in _flat_chunks(tensor):
            high += torch.bincount((_magnitude_bits(chunk) >> 16).reshape(-1), minlength=1 << 16).cpu()
    sharding.all_reduce_sum_(high, mesh)
    if high[0x7F80:].any():
        raise ValueError("weights contain NaN or infinity; cannot rank them by magnitude")
    cum = high.cumsum(0)
    hi = int(torch.searchsorted(cum, k))
    below = int(cum[hi - 1]) if hi > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for tensor in tensors:
        for _, chunk in _flat_chunks(tensor):
            bits = _magnitude_bits(chunk)
            in_bucket = bits[(bits >> 16) == hi]
            if in_bucket.numel():
                low += torch.bincount((in_bucket & 0xFFFF).reshape(-1), minlength=1 << 16).cpu()
    sharding.all_reduce_sum_(low, mesh)
    cum_low = low.cumsum(0)
    lo = int(torch.searchsorted(cum_low, k - below))
    below += int(cum_low[lo - 1]) if lo > 0 else 0
    return (hi << 16) | lo, below


def prune_smallest(tensors: list[Tensor], k: int) -> list[Tensor]:
    """Keep-masks that prune exactly the ``k`` smallest-magnitude entries over ``tensors``.

    Ties at the threshold are broken by position (earlier tensor, then lower flat index, pruned first), so the
    result is deterministic and the count is exact. Sharded tensors (FSDP2) get sharded masks, the same as one
    process would make from the whole tensors.
    """
    masks = [torch.ones(sharding.local(t).shape, dtype=torch.bool, device=t.device) for t in tensors]
    if k <= 0:
        return [sharding.like(mask, t) for mask, t in zip(masks, tensors, strict=True)]
    bits, below = kth_smallest_magnitude(tensors, k)
    ties_to_prune = k - below
    budgets = None
    if sharding.mesh_of(tensors) is not None:  # which ties are first in global order: count them all first
        budgets = sharding.tie_budgets(tensors, [sum(int((_magnitude_bits(c) == bits).count_nonzero())
                                                     for _, c in _flat_chunks(t)) for t in tensors], ties_to_prune)
    for index, (tensor, mask) in enumerate(zip(tensors, masks, strict=True)):
        if budgets is not None:
            ties_to_prune = budgets[index]
        flat_mask = mask.view(-1)
        for start, chunk in _flat_chunks(tensor):
            chunk_bits = _magnitude_bits(chunk)
            flat_mask[start:start + chunk.numel()] = chunk_bits > bits
            if ties_to_prune > 0:
                tie_index = (chunk_bits == bits).nonzero().view(-1)
                keep_ties = tie_index[ties_to_prune:]
                flat_mask[start + keep_ties] = True
                ties_to_prune -= min(ties_to_prune, tie_index.numel())
            else:
                flat_mask[start:start + chunk.numel()] |= chunk_bits == bits
    return [sharding.like(mask, t) for mask, t in zip(masks, tensors, strict=True)]


def masked_std(weight: Tensor, mask: Tensor | None = None) -> float:
    """Standard deviation (unbiased, as ``torch.std``) of the entries of ``weight`` kept by ``mask``, chunked."""
    count, total, total_sq = 0, 0.0, 0.0
    flat_mask = None if mask is None else sharding.local(mask).reshape(-1)
    for start, chunk in _flat_chunks(weight):
        values = chunk.to(torch.float64)
        if flat_mask is not None:
            values = values[flat_mask[start:start + chunk.numel()]]
        count += values.numel()
        total += float(values.sum())
        total_sq += float((values * values).sum())
    count, total, total_sq = sharding.sum_over_shards([count, total, total_sq], weight)
    if count < 2:
        return 0.0
    mean = total / count
    return math.sqrt(max(total_sq - count * mean * mean, 0.0) / (count - 1))


def keep_at_least(weight: Tensor, threshold: float) -> Tensor:
    """Keep-mask of the entries with ``|w| >= threshold``, built chunk by chunk (sharded like ``weight``)."""
    mask = torch.empty(sharding.local(weight).shape, dtype=torch.bool, device=weight.device)
    flat_mask = mask.view(-1)
    for start, chunk in _flat_chunks(weight):
        flat_mask[start:start + chunk.numel()] = chunk.abs() >= threshold
    return sharding.like(mask, weight)


class StdThreshold:
    """Han et al.'s rule: prune the connections with ``|w| < q * std``, the std of the layer's remaining weights.

    Args:
        q: the quality parameter, one number for every layer or a mapping of layer name to q (layers not named
            are left as they are).

    At the first prune the std is that of the dense layer. The std of the survivors grows as small weights go, so
    applying the same q again prunes further: this is how Han's iterative pruning raises the threshold.
    """

    def __init__(self, q: float | Mapping[str, float]) -> None:
        if isinstance(q, Mapping):
            if not q:
                raise ValueError("q is an empty mapping: name at least one layer (nothing to prune)")
            self.q: float | dict[str, float] = {k: check_quality(v, f"q[{k!r}]") for k, v in q.items()}
        else:
            self.q = check_quality(q, "q")

    def thresholds(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, float]:
        """The threshold q x std for each layer this criterion decides."""
        _require_weights(weights)
        if isinstance(self.q, dict):
            qs = {name: self.q[key] for key, name in resolve_layer_names(self.q, weights, "q").items()}
        else:
            qs = dict.fromkeys(weights, self.q)
        require_finite(weights, qs)  # a NaN std would prune the whole layer without a word
        return {name: q * masked_std(weights[name], masks.get(name)) for name, q in qs.items()}

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: keep_at_least(weights[name], threshold)
                for name, threshold in self.thresholds(weights, masks).items()}

    def __repr__(self) -> str:
        return f"StdThreshold(q={self.q!r})"


class LayerSparsity:
    """Prune each layer to a target sparsity (fraction of its weights pruned) by magnitude.

    Args:
        sparsity: one fraction for every layer, or a mapping of layer name to fraction (layers not named are left
            as they are). Each value in [0, 1); exactly ``round(sparsity * numel)`` weights of a layer are pruned.
    """

    def __init__(self, sparsity: float | Mapping[str, float]) -> None:
        if isinstance(sparsity, Mapping):
            if not sparsity:
                raise ValueError("sparsity is an empty mapping: name at least one layer (nothing to prune)")
            self.sparsity: float | dict[str, float] = {
                k: check_sparsity(v, f"sparsity[{k!r}]") for k, v in sparsity.items()}
        else:
            self.sparsity = check_sparsity(sparsity, "sparsity")

    @classmethod
    def from_densities(cls, density: Mapping[str, float]) -> LayerSparsity:
        """Build from per-layer densities (fraction kept), as Han et al.'s tables give them."""
        for key, value in density.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
                raise ValueError(f"density[{key!r}] must be a fraction of weights kept in (0, 1], got {value!r}")
        return cls({key: 1.0 - float(value) for key, value in density.items()})

    def targets(self, weights: Mapping[str, Tensor]) -> dict[str, float]:
        """Target sparsity per parameter name."""
        _require_weights(weights)
        if isinstance(self.sparsity, dict):
            return {name: self.sparsity[key]
                    for key, name in resolve_layer_names(self.sparsity, weights, "sparsity").items()}
        return dict.fromkeys(weights, self.sparsity)

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        result = {}
        targets = self.targets(weights)
        require_finite(weights, targets)
        for name, target in targets.items():
            weight = weights[name]
            (result[name],) = prune_smallest([weight], round(target * weight.numel()))
        return result

    def __repr__(self) -> str:
        return f"LayerSparsity(sparsity={self.sparsity!r})"


class GlobalSparsity:
    """Prune the smallest-magnitude weights across layers until ``sparsity`` of all of them is pruned.

    Args:
        sparsity: fraction of all the weights considered that is pruned, in [0, 1).
        layers: restrict to these layer names (default: every weight the pruner targets).
    """

    def __init__(self, sparsity: float, layers: Iterable[str] | None = None) -> None:
        self.sparsity = check_sparsity(sparsity, "sparsity")
        self.layers = None if layers is None else list(layers)
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty: name at least one layer (nothing to prune)")

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _require_weights(weights)
        names = list(weights) if self.layers is None else list(
            resolve_layer_names(self.layers, weights, "layers").values())
        require_finite(weights, names)
        tensors = [weights[name] for name in names]
        k = round(self.sparsity * sum(t.numel() for t in tensors))
        return dict(zip(names, prune_smallest(tensors, k), strict=True))

    def __repr__(self) -> str:
        return f"GlobalSparsity(sparsity={self.sparsity!r}, layers={self.layers!r})"


def han2015(network: str) -> LayerSparsity:
    """Han et al. 2015's published per-layer densities as a criterion, keyed by the layer names of magprune's
    models: ``"lenet-300-100"``, ``"lenet-5"``, ``"alexnet"`` or ``"vgg-16"``."""
    if network not in HAN2015_DENSITIES:
        raise ValueError(f"network must be one of {sorted(HAN2015_DENSITIES)}, got {network!r}")
    return LayerSparsity.from_densities(HAN2015_DENSITIES[network])
