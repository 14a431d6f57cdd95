"""Sensitivity room: prune one layer at a time over a grid of sparsities, measure, recommend per-layer targets."""

from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from magprune.criteria import check_sparsity, prune_smallest
from magprune.targets import module_name, select_parameters

DEFAULT_GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)

Evaluate = Callable[[nn.Module], float]


@dataclass
class SensitivityResult:
    """Metric (higher is better, e.g. accuracy) per layer per sparsity, each layer pruned alone, no retraining."""

    baseline: float
    sparsities: list[float]
    curves: dict[str, list[float]]  # layer name -> metric at each sparsity of the grid
    kinds: dict[str, str] = field(default_factory=dict)  # layer name -> module class name

    def recommend(self, max_drop: float, model: nn.Module | None = None,
                  evaluate: Evaluate | None = None) -> dict[str, float]:
        """Per-layer sparsity targets for a metric drop of at most ``max_drop`` (no retraining).

        Each layer gets the highest sparsity of the grid whose curve stays within ``max_drop`` of the baseline.
        The scan prunes one layer at a time, so all layers together may drop more; given ``model`` and
        ``evaluate``, the targets are checked jointly and the layer that costs most is stepped down one grid
        notch at a time until the whole model meets the budget (the model is left unchanged).
        """
        if not max_drop >= 0:
            raise ValueError(f"max_drop must be a metric drop >= 0, got {max_drop!r}")
        index = {}
        for layer, curve in self.curves.items():
            ok = [i for i, metric in enumerate(curve) if metric >= self.baseline - max_drop]
            index[layer] = max(ok, default=0)
        if model is None or evaluate is None:
            return {layer: self.sparsities[i] for layer, i in index.items()}
        while True:
            targets = {layer: self.sparsities[i] for layer, i in index.items()}
            if self.baseline - evaluate_with_targets(model, evaluate, targets) <= max_drop:
                return targets
            movable = [layer for layer, i in index.items() if i > 0]
            if not movable:
                return targets
            worst = max(movable, key=lambda layer: self.baseline - self.curves[layer][index[layer]])
            index[worst] -= 1

    def as_rows(self) -> list[dict[str, Any]]:
        return [{"layer": layer, "kind": self.kinds.get(layer, ""), "sparsity": s, "metric": m,
                 "drop": self.baseline - m}
                for layer, curve in self.curves.items() for s, m in zip(self.sparsities, curve, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "sparsities": self.sparsities, "curves": self.curves, "kinds": self.kinds}


_WORKER: dict[str, Any] = {}


def _init_worker(model: nn.Module, evaluate: Evaluate, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(model=model, evaluate=evaluate)


def _evaluate_pruned(model: nn.Module, evaluate: Evaluate, param_name: str, sparsity: float) -> float:
    param = model.get_parameter(param_name)
    saved = param.detach().clone()
    try:
        with torch.no_grad():
            (keep,) = prune_smallest([param.detach()], round(sparsity * param.numel()))
            param.mul_(keep)
        return float(evaluate(model))
    finally:
        with torch.no_grad():
            param.copy_(saved)


def evaluate_with_targets(model: nn.Module, evaluate: Evaluate, targets: dict[str, float]) -> float:
    """``evaluate`` the model with every layer of ``targets`` pruned to its sparsity; the model is restored after."""
    params = {module_name(n): p for n, p in model.named_parameters()}
    saved = {layer: params[layer].detach().clone() for layer in targets}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for layer, sparsity in targets.items():
                param = params[layer]
                (keep,) = prune_smallest([param.detach()], round(sparsity * param.numel()))
                param.mul_(keep)
        return float(evaluate(model))
    finally:
        model.train(was_training)
        with torch.no_grad():
            for layer, value in saved.items():
                params[layer].copy_(value)


def _worker_task(task: tuple[str, float]) -> float:
    return _evaluate_pruned(_WORKER["model"], _WORKER["evaluate"], *task)


def sensitivity_scan(
    model: nn.Module,
    evaluate: Evaluate,
    sparsities: Sequence[float] = DEFAULT_GRID,
    layers: Iterable[str] | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> SensitivityResult:
    """Prune each layer alone to each sparsity of the grid (by magnitude, no retraining) and ``evaluate`` it.

    Args:
        model: the trained model; it is left exactly as it was.
        evaluate: ``evaluate(model) -> metric`` (higher is better), e.g. test accuracy.
        sparsities: the grid, fractions pruned in [0, 1).
        layers: module or parameter names or patterns (default: every Linear/Conv weight).
        workers: spread the evaluations over this many processes (0: in this process). Needs the ``fork`` start
            method (Linux); each worker gets its own copy of the model and one thread.
        progress: show a progress bar.
    """
    grid = [check_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)]
    if not grid:
        raise ValueError("sparsities is empty: give at least one sparsity to scan")
    if workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers}")
    params = select_parameters(model, list(layers) if layers is not None else None)
    modules = dict(model.named_modules())
    kinds = {module_name(n): type(modules.get(module_name(n), model)).__name__ for n in params}
    tasks = [(name, s) for name in params for s in grid]
    was_training = model.training
    model.eval()
    try:
        baseline = float(evaluate(model))
        if workers:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_init_worker,
                    initargs=(copy.deepcopy(model), evaluate, 1)) as pool:
                results = list(_progress(pool.map(_worker_task, tasks), len(tasks), progress))
        else:
            results = [_evaluate_pruned(model, evaluate, *task) for task in _progress(tasks, len(tasks), progress)]
    finally:
        model.train(was_training)
    curves = {module_name(name): results[i * len(grid):(i + 1) * len(grid)] for i, name in enumerate(params)}
    return SensitivityResult(baseline=baseline, sparsities=grid, curves=curves, kinds=kinds)


def _progress(items: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="sensitivity", unit="eval")
