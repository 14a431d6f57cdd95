"""Demo room: Han et al.'s train -> prune -> retrain on scikit-learn's bundled digits, no download needed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from magprune.criteria import StdThreshold
from magprune.experiment.data import load_digits_split
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
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epochs: int,
        batch_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


@dataclass
class DemoResult:
    dense_accuracy: float
    pruned_accuracy: float
    retrained_accuracy: float
    compression: float
    seconds: float


def run_demo(q: float = 1.0, rounds: int = 2, epochs: int = 40, retrain_epochs: int = 20, seed: int = 0,
             echo: Callable[[str], None] = print) -> DemoResult:
    """Train a small MLP on digits, prune it Han's way (q x std per layer) in ``rounds`` rounds with retraining."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(seed)
    model = DigitsMLP()
    lr, weight_decay = 0.05, 1e-4  # L2 throughout: Han et al.'s best setting
    echo(f"digits: {len(y_train)} train / {len(y_test)} test images; model 64-256-128-10")
    fit(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay),
        x_train, y_train, epochs, 32, seed)
    dense = accuracy(model, x_test, y_test)
    echo(f"dense:            test accuracy {100 * dense:.2f}%")

    pruner = Pruner(model)
    # Retrain at 1/10 of the dense learning rate, as Han et al. did for the LeNets.
    optimizer = torch.optim.SGD(model.parameters(), lr=lr / 10, momentum=0.9, weight_decay=weight_decay)
    pruner.attach(optimizer)
    pruned = retrained = dense
    for round_ in range(1, rounds + 1):
        densities = pruner.prune(StdThreshold(q))
        pruned = accuracy(model, x_test, y_test)
        kept = ", ".join(f"{name.removesuffix('.weight')} {100 * d:.1f}%" for name, d in densities.items())
        echo(f"round {round_} pruned:  test accuracy {100 * pruned:.2f}% (no retraining; kept {kept})")
        fit(model, optimizer, x_train, y_train, retrain_epochs, 32, seed + round_)
        pruner.check()
        retrained = accuracy(model, x_test, y_test)
        echo(f"round {round_} retrain: test accuracy {100 * retrained:.2f}%")
    report = sparsity_report(model, x_test[:1])
    echo("")
    echo(report.to_text())
    seconds = time.perf_counter() - start
    echo(f"\naccuracy: dense {100 * dense:.2f}% -> pruned {100 * pruned:.2f}% -> retrained {100 * retrained:.2f}% "
         f"at {report.compression:.1f}x fewer weights ({seconds:.1f} s)")
    return DemoResult(dense, pruned, retrained, report.compression, seconds)
