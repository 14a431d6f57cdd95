"""Demo room: Han et al.'s train -> prune -> retrain on scikit-learn's bundled digits, no download needed."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from magprune.criteria import StdThreshold
from magprune.experiment.config import TrainConfig
from magprune.experiment.data import load_digits_split
from magprune.experiment.train import Trainer, evaluate
from magprune.pruner import Pruner
from magprune.report import sparsity_report


class DigitsMLP(nn.Sequential):
    """64-256-128-10 ReLU MLP for 8x8 digits (a small LeNet-300-100)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(256, 128)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(128, 10)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    return 1.0 - evaluate(model, x, y)[1]


@dataclass
class DemoResult:
    dense_accuracy: float
    pruned_accuracy: float
    retrained_accuracy: float
    compression: float
    seconds: float


def check_demo_arguments(q: float, rounds: int, epochs: int, retrain_epochs: int, seed: int) -> None:
    """Raise ValueError naming the first bad argument of :func:`run_demo`."""
    if not math.isfinite(q) or q < 0:
        raise ValueError(f"q must be a finite quality parameter >= 0 (threshold = q x std), got {q}")
    for name, value, least in (("rounds", rounds, 1), ("epochs", epochs, 1), ("retrain_epochs", retrain_epochs, 0),
                               ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if seed >= 2**63:
        raise ValueError(f"seed must be below 2**63, got {seed}")


def run_demo(q: float = 1.0, rounds: int = 2, epochs: int = 40, retrain_epochs: int = 20, seed: int = 0,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Train a small MLP on digits, prune it Han's way (q x std per layer) in ``rounds`` rounds with retraining."""
    check_demo_arguments(q, rounds, epochs, retrain_epochs, seed)
    start = time.perf_counter()
    torch.manual_seed(seed)
    train, (x_test, y_test) = load_digits_split(seed)
    model = DigitsMLP()
    pruner = Pruner(model)
    # SGD with momentum and L2 on the weights, Han et al.'s best setting; retraining at 1/10 of the dense rate,
    # as they did for the LeNets. The same epoch loop as `magprune run` (experiment.train.Trainer).
    cfg = TrainConfig(lr=0.05, momentum=0.9, epochs=epochs, batch_size=32, regularization="l2", strength=1e-4)
    echo(f"digits: {len(train[1])} train / {len(y_test)} test images; model 64-256-128-10")
    Trainer(model, train, (x_test, y_test), cfg, seed=seed, stage="dense",
            penalized=list(pruner.params.values())).fit()
    dense = accuracy(model, x_test, y_test)
    echo(f"dense:            test accuracy {100 * dense:.2f}%")

    pruned = retrained = dense
    for round_ in range(1, rounds + 1):
        densities = pruner.prune(StdThreshold(q))
        pruned = accuracy(model, x_test, y_test)
        kept = ", ".join(f"{name.removesuffix('.weight')} {100 * d:.1f}%" for name, d in densities.items())
        echo(f"round {round_} pruned:  test accuracy {100 * pruned:.2f}% (no retraining; kept {kept})")
        trainer = Trainer(model, train, (x_test, y_test), cfg, lr=cfg.lr / 10, epochs=retrain_epochs,
                          seed=seed + round_, stage=f"retrain-{round_}", penalized=list(pruner.params.values()))
        handle = pruner.attach(trainer.optimizer)
        trainer.fit()
        pruner.check()
        handle.remove()
        retrained = accuracy(model, x_test, y_test)
        echo(f"round {round_} retrain: test accuracy {100 * retrained:.2f}%")
    report = sparsity_report(model, x_test[:1])
    echo("")
    echo(report.to_text())
    seconds = time.perf_counter() - start
    echo(f"\naccuracy: dense {100 * dense:.2f}% -> pruned {100 * pruned:.2f}% -> retrained {100 * retrained:.2f}% "
         f"at {report.compression:.1f}x fewer weights ({seconds:.1f} s)")
    return DemoResult(dense, pruned, retrained, report.compression, seconds)
