import pytest
import torch
from torch import nn
from torch.nn import functional as F

from magprune import (
    DropoutRescaler,
    LayerSparsity,
    Pruner,
    add_penalty_gradient,
    freeze,
    rescaled_dropout,
    weight_penalty,
)


def test_rescaled_dropout_is_hans_equation_2():
    assert rescaled_dropout(0.5, 0.09) == pytest.approx(0.15)
    assert rescaled_dropout(0.5, 1.0) == 0.5
    with pytest.raises(ValueError, match="p_original"):
        rescaled_dropout(1.0, 0.5)
    with pytest.raises(ValueError, match="density"):
        rescaled_dropout(0.5, 1.5)


def test_dropout_rescaler_maps_dropout_to_the_layer_before_it(convnet):
    pruner = Pruner(convnet)
    rescaler = DropoutRescaler(convnet, pruner)
    assert rescaler.mapping == {"drop": "fc1.weight"}
    pruner.prune(LayerSparsity({"fc1": 0.91}))
    assert rescaler.apply() == {"drop": pytest.approx(0.5 * 0.09**0.5, abs=1e-3)}
    pruner.prune(LayerSparsity({"fc1": 0.96}))
    rates = rescaler.apply()
    assert convnet.drop.p == rates["drop"]
    assert convnet.drop.p == pytest.approx(0.5 * 0.04**0.5, abs=1e-3)  # from D_o, not compounded
    rescaler.restore()
    assert convnet.drop.p == 0.5
    assert DropoutRescaler(convnet, pruner, {"drop": "fc2"}).mapping == {"drop": "fc2.weight"}
    with pytest.raises(ValueError, match="not a dropout module"):
        DropoutRescaler(convnet, pruner, {"fc1": "fc2"})
    with pytest.raises(ValueError, match="not a pruned layer"):
        DropoutRescaler(convnet, pruner, {"drop": "fc9"})


def test_weight_penalty_values():
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 3.0]])
    assert weight_penalty([a, b], "l1", 0.1).item() == pytest.approx(0.6)
    assert weight_penalty([a, b], "l2", 0.1).item() == pytest.approx(0.05 * 14)
    with pytest.raises(ValueError, match="kind must be 'l1' or 'l2'"):
        weight_penalty([a], "l3", 0.1)
    with pytest.raises(ValueError, match="strength"):
        weight_penalty([a], "l1", -1.0)


def test_l1_penalty_keeps_pruned_weights_at_zero(convnet, batch):
    pruner = Pruner(convnet)
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.05)
    pruner.attach(optimizer)
    pruner.prune(LayerSparsity(0.5))
    x, y = batch
    for _ in range(10):
        optimizer.zero_grad()
        (F.cross_entropy(convnet(x), y) + weight_penalty(pruner.params.values(), "l1", 1e-3)).backward()
        optimizer.step()
    pruner.check()


def test_freeze_conv_while_retraining_fc(convnet, batch):
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    conv_before = convnet.conv1.weight.detach().clone()
    fc_before = convnet.fc1.weight.detach().clone()
    x, y = batch
    with freeze(convnet, "conv"):
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(convnet(x), y).backward()
            optimizer.step()
        assert convnet.conv1.weight.grad is None
    assert torch.equal(convnet.conv1.weight, conv_before)
    assert not torch.equal(convnet.fc1.weight, fc_before)
    assert convnet.conv1.weight.requires_grad
    handle = freeze(convnet, "fc")
    assert not convnet.fc1.weight.requires_grad and convnet.conv2.weight.requires_grad
    handle.remove()
    assert convnet.fc1.weight.requires_grad
    with pytest.raises(ValueError, match="no conv layers"):
        freeze(nn.Linear(2, 2), "conv")
    with pytest.raises(ValueError, match="kind must be"):
        freeze(convnet, "rnn")


def test_dropout_rescaler_follows_the_weight_not_the_bias_with_include_bias(convnet):
    pruner = Pruner(convnet, include_bias=True)
    rescaler = DropoutRescaler(convnet, pruner)
    assert rescaler.mapping == {"drop": "fc1.weight"}
    pruner.prune(LayerSparsity({"fc1.weight": 0.91}))  # bias left dense: density 1.0
    assert rescaler.apply() == {"drop": pytest.approx(0.5 * 0.09**0.5, abs=1e-3)}


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_penalty_gradient_after_backward_equals_the_penalty_in_the_loss(kind):
    """The pipeline adds the penalty's gradient after backward instead of putting the penalty in the loss: same
    gradients, pruned entries still zero, frozen parameters untouched, an unused one given the penalty's alone."""
    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(2, 2))  # [3] unused
        Pruner(net[0], ["weight"]).prune(LayerSparsity({"weight": 0.5}))
        net[2].weight.requires_grad_(False)  # frozen
        nets.append(net)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    in_loss, after = nets
    params = lambda net: [net[0].weight, net[2].weight, net[3].weight]  # noqa: E731
    (F.cross_entropy(in_loss[2](in_loss[1](in_loss[0](x))), y) + weight_penalty(params(in_loss), kind, 0.3)).backward()
    F.cross_entropy(after[2](after[1](after[0](x))), y).backward()
    assert after[3].weight.grad is None
    add_penalty_gradient(params(after), kind, 0.3)
    for a, b in zip(params(in_loss), params(after), strict=True):
        if a.grad is None:
            assert b.grad is None  # the frozen one
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)
    assert after[2].weight.grad is None
    assert (after[0].weight.grad[after[0].weight == 0] == 0).all()  # pruned entries get nothing
    with pytest.raises(ValueError, match="kind"):
        add_penalty_gradient(params(after), "l3", 0.1)
