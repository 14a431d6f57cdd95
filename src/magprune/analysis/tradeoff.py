"""Trade-off room: accuracy loss vs fraction of parameters pruned for L1/L2, with and without retraining, and
iterative pruning (Han et al. Fig. 5)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from magprune.criteria import GlobalSparsity, LayerSparsity, check_sparsity
from magprune.pruner import Pruner

MakeDense = Callable[[str], nn.Module]  # regularization "l1" | "l2" -> dense trained model
Retrain = Callable[[nn.Module, Pruner, str], None]  # retrain in place, pruner attached by the callee
Evaluate = Callable[[nn.Module], float]

Curves = dict[str, list[tuple[float, float]]]


def tradeoff_curves(
    make_dense: MakeDense,
    retrain: Retrain,
    evaluate: Evaluate,
    sparsities: Sequence[float],
    *,
    regularizations: Iterable[str] = ("l1", "l2"),
    iterative: bool = True,
    scope: str = "layer",
    progress: Callable[[str], None] | None = None,
) -> tuple[Curves, dict[str, float]]:
    """Accuracy loss (dense metric minus pruned metric) at each sparsity, per recipe.

    For each regularization, one dense model is trained; each sparsity of the grid is then applied to a copy of
    it, measured right after pruning ("... w/o retrain") and after ``retrain`` ("... w/ retrain"). With
    ``iterative``, the L2 model is also pruned step by step along the grid, retraining after each step
    ("L2 reg, iterative prune and retrain"), as Han et al. do to reach their highest compression.

    Returns the curves (label -> [(sparsity, loss)]) and the dense metric of each regularization.
    """
    grid = sorted(check_sparsity(s, f"sparsities[{i}]") for i, s in enumerate(sparsities))
    if not grid:
        raise ValueError("sparsities is empty: give at least one sparsity")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    regularizations = list(regularizations)
    for reg in regularizations:
        if reg not in ("l1", "l2"):
            raise ValueError(f"regularizations must be 'l1' or 'l2', got {reg!r}")
    criterion = GlobalSparsity if scope == "global" else LayerSparsity
    say = progress or (lambda message: None)
    curves: Curves = {}
    dense_metric: dict[str, float] = {}
    dense_models: dict[str, nn.Module] = {}
    for reg in regularizations:
        say(f"training dense model with {reg.upper()} regularization")
        dense = make_dense(reg)
        dense_models[reg] = dense
        dense_metric[reg] = evaluate(dense)
        without, with_ = [], []
        for sparsity in grid:
            model = copy.deepcopy(dense)
            pruner = Pruner(model)
            pruner.prune(criterion(sparsity))
            without.append((sparsity, dense_metric[reg] - evaluate(model)))
            say(f"{reg.upper()} sparsity {sparsity:.2f}: retraining")
            retrain(model, pruner, reg)
            pruner.check()
            with_.append((sparsity, dense_metric[reg] - evaluate(model)))
            pruner.remove()
        curves[f"{reg.upper()} reg w/o retrain"] = without
        curves[f"{reg.upper()} reg w/ retrain"] = with_
    if iterative and "l2" in dense_models:
        model = copy.deepcopy(dense_models["l2"])
        pruner = Pruner(model)
        points = []
        for sparsity in grid:
            say(f"iterative L2 sparsity {sparsity:.2f}: prune and retrain")
            pruner.prune(criterion(sparsity))
            retrain(model, pruner, "l2")
            pruner.check()
            points.append((sparsity, dense_metric["l2"] - evaluate(model)))
        pruner.remove()
        curves["L2 reg, iterative prune and retrain"] = points
    return curves, dense_metric
