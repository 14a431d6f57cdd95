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


class AlexNet(nn.Module):
    """AlexNet as in Caffe BVLC: 96 conv1 filters, grouped conv2/4/5, LRN, dropout on fc6/fc7 (61M weights).

    Layer names follow Caffe (conv1..conv5, fc6..fc8), so Han et al.'s per-layer densities key onto them.
    Input 3x227x227.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.relu = nn.ReLU()
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(4096, 4096)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(4096, num_classes)

    def forward(self, x):
        x = self.norm(self.pool(self.relu(self.conv1(x))))
        x = self.norm(self.pool(self.relu(self.conv2(x))))
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))
        x = self.drop6(self.relu(self.fc6(x.flatten(1))))
        x = self.drop7(self.relu(self.fc7(x)))
        return self.fc8(x)


VGG16_PLAN: tuple[tuple[str, int], ...] = (
    ("conv1_1", 64), ("conv1_2", 64), ("pool", 0),
    ("conv2_1", 128), ("conv2_2", 128), ("pool", 0),
    ("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256), ("pool", 0),
    ("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512), ("pool", 0),
    ("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512), ("pool", 0),
)


class VGG16(nn.Module):
    """VGG-16 (configuration D) with Caffe layer names conv1_1..conv5_3, fc6..fc8.

    ``image_size=224`` is the ImageNet network (138M weights, 30.9 GFLOP); ``image_size=32`` with ``hidden=512``
    is the usual CIFAR-size variant (15M weights).
    """

    def __init__(self, num_classes: int = 1000, image_size: int = 224, hidden: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
        channels = 3
        for name, out in VGG16_PLAN:
            if out:
                setattr(self, name, nn.Conv2d(channels, out, 3, padding=1))
                channels = out
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        side = image_size // 32
        self.fc6 = nn.Linear(512 * side * side, hidden)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(hidden, hidden)
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        for name, out in VGG16_PLAN:
            x = self.relu(getattr(self, name)(x)) if out else self.pool(x)
        x = self.drop6(self.relu(self.fc6(x.flatten(1))))
        x = self.drop7(self.relu(self.fc7(x)))
        return self.fc8(x)


register_model("alexnet")(AlexNet)
register_model("vgg-16")(VGG16)


@register_model("vgg-16-cifar")
def vgg16_cifar(num_classes: int = 10, dropout: float = 0.5) -> VGG16:
    """VGG-16 for 32x32 inputs: the same 13 conv layers, a 512-512 classifier."""
    return VGG16(num_classes=num_classes, image_size=32, hidden=512, dropout=dropout)
