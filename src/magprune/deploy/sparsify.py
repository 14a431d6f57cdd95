"""Deploy room (sparsify): convert a model's layers to sparse modules where that is measured to be faster."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from magprune.deploy.modules import SparseConv2d, SparseLinear
from magprune.report import forward_example
from magprune.targets import is_hf_conv1d

NEVER_CALLED = ("its forward is never called: the surrounding code computes with its weight directly "
                "(MultiheadAttention's out_proj, a fused fast path)")


@dataclass(frozen=True)
class SparsifyDecision:
    name: str
    kind: str
    density: float
    dense_ms: float
    sparse_ms: float
    converted: bool
    backend: str = "simd"
    reason: str = ""  # why it was (not) converted

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


def _is_candidate(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d) or is_hf_conv1d(module)


def layer_inputs(model: nn.Module, example_input: Any) -> dict[str, tuple[int, ...]]:
    """The full input shape of each Linear, Conv2d and ``transformers`` Conv1D layer whose forward the model calls
    on ``example_input`` (a tensor, a tuple of arguments or a dict of keyword arguments)."""
    if example_input is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if inputs and isinstance(inputs[0], Tensor):
                shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(recorder(n)) for n, m in model.named_modules() if _is_candidate(m)]
    try:
        with torch.no_grad():
            forward_example(model, example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def layer_input_shapes(model: nn.Module, example_input: Any) -> dict[str, tuple[int, ...]]:
    """Per-example input shapes (batch dimension dropped) of the layers :func:`layer_inputs` sees."""
    return {name: shape[1:] for name, shape in layer_inputs(model, example_input).items()}


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, tuple | list):
        return [t for value in output for t in _tensors(value)]
    return []


def _mismatch(model: nn.Module, example_input: Any, reference: list[Tensor]) -> str:
    """Why ``model`` does not reproduce ``reference`` on ``example_input`` ("" when it does)."""
    try:
        with torch.inference_mode():
            got = _tensors(forward_example(model, example_input))
    except Exception as error:  # whatever the surrounding code raises on a module it did not expect
        return f"the model fails with it sparse ({type(error).__name__}: {error})"
    if len(got) != len(reference) or any(
            a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-3,
                                                     atol=1e-4 * max(float(b.abs().max()) if b.numel() else 0, 1.0))
            for a, b in zip(got, reference, strict=False)):
        return "the model's output differs with it sparse"
    return ""


def sparsify(model: nn.Module, *, batch_size: int = 1, example_input: Any = None,
             max_density: float = 0.5, min_speedup: float = 1.2, repeats: int = 5) -> nn.Module:
    """A copy of ``model`` whose Linear, ``transformers`` Conv1D and Conv2d layers run sparse where that is measured
    to be faster.

    Give ``example_input`` (a batch the model accepts: a tensor, a tuple of arguments or a dict of keyword
    arguments): each layer is then timed at the input shape it really gets (tokens included), a layer whose
    forward the model never calls is left alone, and each conversion is checked by running the whole model, kept
    only if its output still matches the dense model's; at the end the whole model is timed, and if the sparse one
    is slower every conversion is undone. Without it, only Linear and Conv1D layers are considered, timed on random
    input of ``batch_size`` rows, and the result is not checked.

    A candidate (density <= ``max_density``) is converted only when the sparse module is at least ``min_speedup``
    times faster (a Linear with both sparse backends, the faster one kept). Every decision, with its reason, is on
    the returned model as ``sparsify_decisions`` (:func:`format_decisions` prints them).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density must be a fraction of weights kept in (0, 1], got {max_density!r}")
    model = copy.deepcopy(model).eval()
    inputs = layer_inputs(model, example_input)
    checked = example_input is not None
    reference = []
    if checked:
        with torch.inference_mode():
            reference = _tensors(forward_example(model, example_input))
    decisions = []
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not _is_candidate(module):
            continue
        kind = type(module).__name__
        density = float((module.weight != 0).float().mean())

        def skip(reason: str, name=name, kind=kind, density=density) -> None:
            decisions.append(SparsifyDecision(name, kind, density, math.nan, math.nan, False, reason=reason))

        conv = isinstance(module, nn.Conv2d)
        if checked and name not in inputs:
            skip(NEVER_CALLED)
            continue
        if conv and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
            skip("SparseConv2d supports groups=1 and zero padding given as integers only")
            continue
        if conv and not checked:
            skip("a Conv2d needs example_input (its input size)")
            continue
        if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
            skip(f"the sparse kernels run float32 on the CPU, this layer is {module.weight.dtype} on "
                 f"{module.weight.device}")
            continue
        if density > max_density:
            skip(f"density {density:.3f} > max_density {max_density}")
            continue
        in_features = module.weight.shape[0] if is_hf_conv1d(module) else getattr(module, "in_features", None)
        shape = inputs.get(name) or (batch_size, in_features)
        candidates = [SparseConv2d(module)] if conv else [SparseLinear(module), SparseLinear(module, backend="torch")]
        x = torch.randn(shape)
        with torch.inference_mode():
            dense_ms = best_ms(lambda m=module, x=x: m(x), repeats)
            sparse_ms, sparse = min(((best_ms(lambda m=c, x=x: m(x), repeats), c) for c in candidates),
                                    key=lambda timed: timed[0])
        converted = dense_ms >= min_speedup * sparse_ms
        reason = (f"sparse {dense_ms / sparse_ms:.2f}x faster at input {list(shape)}" if converted else
                  f"sparse only {dense_ms / sparse_ms:.2f}x faster at input {list(shape)} (< min_speedup "
                  f"{min_speedup})")
        if converted:
            model.set_submodule(name, sparse)
            failure = _mismatch(model, example_input, reference) if checked else ""
            if failure:
                model.set_submodule(name, module)
                converted, reason = False, failure
            else:
                replaced[name] = module
        decisions.append(SparsifyDecision(name, kind, density, dense_ms, sparse_ms, converted,
                                          getattr(sparse, "backend", "simd"), reason))
    if checked and min_speedup >= 1.0 and any(d.converted for d in decisions):
        decisions = _undo_if_slower(model, example_input, decisions, replaced, repeats)
    model.sparsify_decisions = decisions
    return model


def _undo_if_slower(model: nn.Module, example_input: Any, decisions: list[SparsifyDecision],
                    replaced: dict[str, nn.Module], repeats: int) -> list[SparsifyDecision]:
    """Time the whole model sparse against dense (the replaced modules put back); if sparse is slower, leave the
    dense modules in and say so."""
    sparse = {name: model.get_submodule(name) for name in replaced}

    def put(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            model.set_submodule(name, module)

    with torch.inference_mode():
        put(replaced)
        dense_ms = best_ms(lambda: forward_example(model, example_input), repeats)
        put(sparse)
        sparse_ms = best_ms(lambda: forward_example(model, example_input), repeats)
    if sparse_ms <= dense_ms:
        return decisions
    put(replaced)
    reason = f"the whole model ran slower sparse ({sparse_ms:.3f} ms against {dense_ms:.3f} ms dense)"
    return [dataclasses.replace(d, converted=False, reason=reason) if d.converted else d for d in decisions]


def format_decisions(decisions: list[SparsifyDecision]) -> str:
    """The decisions of :func:`sparsify` as a table: what was converted, what was not, and why."""
    lines = [f"{'layer':<32} {'kind':<14} {'density':>7} {'dense ms':>9} {'sparse ms':>9}  converted  reason"]
    for d in decisions:
        lines.append(f"{d.name:<32} {d.kind:<14} {d.density:>7.3f} {d.dense_ms:>9.3f} {d.sparse_ms:>9.3f}  "
                     f"{'yes' if d.converted else 'no':<9}  {d.reason}")
    converted = sum(d.converted for d in decisions)
    lines.append(f"{converted} of {len(decisions)} layers converted")
    return "\n".join(lines)
