"""Shared test fixtures: small models with Linear and Conv layers; compiled kernels cached in a directory of this
test session (inherited by the CLI and gloo subprocesses), not in the user's cache."""

import os
import tempfile

import pytest
import torch
from torch import nn

os.environ.setdefault("MAGPRUNE_KERNEL_CACHE", tempfile.mkdtemp(prefix="magprune-test-kernels-"))


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.fc1 = nn.Linear(6 * 4 * 4, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(self.drop(x))


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return SmallConvNet()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
