import pytest
import torch
from torch import nn

import magprune
from magprune.deploy.shrink import ShrinkError, shrink


def _pruned(model: nn.Module, sparsity: float) -> nn.Module:
    magprune.Pruner(model).prune(magprune.LayerSparsity(sparsity))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.bias.normal_()  # nonzero biases: constant units must be folded, not just dropped
    return model.eval()


@pytest.mark.parametrize(("name", "shape"), [("lenet-300-100", (6, 784)), ("lenet-5", (6, 1, 28, 28))])
def test_shrunk_registry_models_match_outputs_and_are_smaller(name, shape):
    torch.manual_seed(0)
    model = _pruned(magprune.create_model(name), 0.97)
    small = shrink(model)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(model)


def test_dead_units_removed_and_constant_folded_in_sequential_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0  # unit 1: no inputs, emits relu(bias)
        model[0].bias[1] = 0.7
        model[2].weight[:, 3] = 0  # unit 3: no outputs
        model[2].weight[2] = 0  # layer 2 unit 2: no inputs, emits tanh(bias)
    small = shrink(model)
    assert (small[0].in_features, small[0].out_features) == (5, 2)
    assert (small[2].in_features, small[2].out_features) == (2, 2)
    assert small[4].in_features == 2
    x = torch.randn(7, 5)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_conv_to_fc_flatten_with_dead_channel():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).eval()
    with torch.no_grad():
        model[0].weight[2] = 0
        model[0].bias[2] = 0.5
        model[4].weight[:, 0:9] = 0  # channel 0 unread
    small = shrink(model)
    assert small[0].out_channels == 2 and small[4].in_features == 18
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_padded_conv_keeps_nonzero_constant_channel():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 1.0
    small = shrink(model)
    assert small[0].out_channels == 3  # padding makes its contribution position-dependent
    x = torch.randn(2, 1, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_unsupported_graph_is_refused_clearly():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(self.fc1(x)) + x

    with pytest.raises(ShrinkError, match="single chain"):
        shrink(Residual())
    with pytest.raises(ShrinkError, match="BatchNorm|does not know"):
        shrink(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
