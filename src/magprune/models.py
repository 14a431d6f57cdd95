"""Models room: a small registry of reference networks (plain nn.Modules) by name, open to users' own."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model constructor available as ``create_model(name, **kwargs)``."""

    def decorate(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = constructor
        return constructor

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model by name; unknown names raise ValueError listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"model must be one of {list_models()}, got {name!r}")
    return _REGISTRY[name](**kwargs)


class LeNet300100(nn.Module):
    """LeNet-300-100: FC 784-300-100-10 with ReLU (Han et al. Table 2: 266,200 weights, 532K FLOP)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = self.drop1(self.relu1(self.fc1(x.flatten(1))))
        x = self.drop2(self.relu2(self.fc2(x)))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe: conv 20@5x5, max-pool, conv 50@5x5, max-pool, FC 800-500, ReLU, FC 500-10.

    No ReLU after the convolutions (Caffe's variant), so the weight and FLOP counts match Han et al.'s Table 3
    (430,500 weights, 4.59M FLOP).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(800, 500)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.drop(self.relu(self.fc1(x.flatten(1)))))


register_model("lenet-300-100")(LeNet300100)
register_model("lenet-5")(LeNet5)
