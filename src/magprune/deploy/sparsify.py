"""Deploy room (sparsify): convert a model's layers to sparse modules where that is measured to be faster."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from magprune.deploy.modules import SparseConv2d, SparseLinear


@dataclass(frozen=True)
class SparsifyDecision:
    name: str
    kind: str
    density: float
    dense_ms: float
    sparse_ms: float
    converted: bool
    backend: str = "simd"

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms


def best_ms(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call, in milliseconds."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layer_input_shapes(model: nn.Module, example_input: Tensor | None) -> dict[str, tuple[int, ...]]:
    if example_input is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))
        return hook

    hooks = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear | nn.Conv2d)]
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def sparsify(model: nn.Module, *, batch_size: int = 1, example_input: Tensor | None = None,
             max_density: float = 0.5, min_speedup: float = 1.2, repeats: int = 5) -> nn.Module:
    """A copy of ``model`` whose Linear (and Conv2d) layers run sparse where that is measured to be faster.

    Each candidate layer (density <= ``max_density``) is timed dense vs sparse on random input of ``batch_size``
    rows (a Linear with both sparse backends, the faster one kept), and converted only when the sparse module is at
    least ``min_speedup`` times faster, so a converted layer should never be slower than dense. Conv2d layers are
    considered only when ``example_input`` is given (their spatial size comes from it). The decisions are on the
    returned model as ``sparsify_decisions``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be a fraction of weights kept in (0, 1], got {max_density!r}")
    model = copy.deepcopy(model).eval()
    input_shapes = layer_input_shapes(model, example_input)
    decisions = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            shape: tuple[int, ...] = (batch_size, module.in_features)
            sparse_cls: type[nn.Module] = SparseLinear
        elif isinstance(module, nn.Conv2d) and name in input_shapes and module.groups == 1 \
                and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            shape, sparse_cls = (batch_size, *input_shapes[name]), SparseConv2d
        else:
            continue
        density = float((module.weight != 0).float().mean())
        if density > max_density:
            decisions.append(SparsifyDecision(name, type(module).__name__, density, math.nan, math.nan, False))
            continue
        candidates = [sparse_cls(module)]
        if sparse_cls is SparseLinear:
            candidates.append(SparseLinear(module, backend="torch"))
        x = torch.randn(shape)
        with torch.inference_mode():
            dense_ms = best_ms(lambda m=module, x=x: m(x), repeats)
            sparse_ms, sparse = min(((best_ms(lambda m=c, x=x: m(x), repeats), c) for c in candidates),
                                    key=lambda timed: timed[0])
        converted = dense_ms >= min_speedup * sparse_ms
        decisions.append(SparsifyDecision(name, type(module).__name__, density, dense_ms, sparse_ms, converted,
                                          getattr(sparse, "backend", "simd")))
        if converted:
            model.set_submodule(name, sparse)
    model.sparsify_decisions = decisions
    return model
