import pytest
import torch
from torch import nn

import magprune
from magprune import chunked, criteria
from magprune.criteria import HAN2015_DENSITIES


def test_alexnet_matches_han_table_4():
    report = magprune.sparsity_report(magprune.create_model("alexnet"), torch.zeros(1, 3, 227, 227))
    rows = {r.layer: (round(r.weights, -3), round(r.flops, -6)) for r in report.rows}
    assert rows == {"conv1": (35_000, 211_000_000), "conv2": (307_000, 448_000_000),
                    "conv3": (885_000, 299_000_000), "conv4": (664_000, 224_000_000),
                    "conv5": (442_000, 150_000_000), "fc6": (37_749_000, 75_000_000),
                    "fc7": (16_777_000, 34_000_000), "fc8": (4_096_000, 8_000_000)}
    assert round(report.weights / 1e6) == 61 and round(report.flops / 1e9, 1) == 1.4


def test_vgg16_138m_pruned_to_han_densities():
    model = magprune.create_model("vgg-16")
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")) == 138_344_128
    pruner = magprune.Pruner(model)
    densities = pruner.prune(magprune.han2015("vgg-16"))
    for layer, density in HAN2015_DENSITIES["vgg-16"].items():
        numel = model.get_parameter(f"{layer}.weight").numel()
        assert round(densities[f"{layer}.weight"] * numel) == numel - round((1 - density) * numel)  # exact
    assert 1 - pruner.sparsity() == pytest.approx(0.0761, abs=1e-3)  # Han: 7.5% kept
    assert all(m.dtype == torch.bool for m in pruner.masks.values())
    assert not pruner._multipliers, "pruning alone must not build the fp32 mask copies used in training"


def test_vgg16_cifar_flops():
    """FLOPs (2 per multiply-add) against an independent count from VGG-16's plan: 3x3 same-padded convolutions,
    a 2x2 pool after each block of 2-3, then 512-512-10 on the 1x1x512 features."""
    report = magprune.sparsity_report(magprune.create_model("vgg-16-cifar"), torch.zeros(1, 3, 32, 32))
    assert report.weights == 14_710_464 + 2 * 512 * 512 + 512 * 10
    assert len(report.rows) == 16
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    expected, side, channels = [], 32, 3
    for step in plan:
        if step == "M":
            side //= 2
            continue
        expected.append(2 * side * side * step * channels * 9)
        channels = step
    expected += [2 * 512 * 512, 2 * 512 * 512, 2 * 512 * 10]
    assert [r.flops for r in report.rows] == expected
    assert report.flops == sum(expected)


def test_chunked_prune_equals_unchunked(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50))
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(8, 300)
    model(x).sum().backward()
    optimizer.step()
    reference = {}
    for chunk in (1 << 18, 1000):
        monkeypatch.setattr(chunked, "CHUNK", chunk)
        m = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 50))
        m.load_state_dict(model.state_dict())
        opt = torch.optim.Adam(m.parameters())
        opt.load_state_dict(optimizer.state_dict())
        pruner = magprune.Pruner(m)
        pruner.attach(opt)
        pruner.prune(magprune.GlobalSparsity(0.7))
        pruner.prune(magprune.StdThreshold(0.5))
        pruner.check()
        reference[chunk] = ([p.clone() for p in m.parameters()],
                            [opt.state[p]["exp_avg_sq"].clone() for p in pruner.params.values()])
    for a, b in zip(*reference.values(), strict=True):
        for x_, y_ in zip(a, b, strict=True):
            assert torch.equal(x_, y_)


class Deep(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def test_several_hundred_layers_stay_linear(monkeypatch):
    """Pruner, criteria, report and state_dict visit each layer a constant number of times."""
    model = Deep(500)
    calls = {"std": 0, "select": 0}
    real_std, real_select = criteria.masked_std, criteria.prune_smallest

    def counting_std(*args, **kwargs):
        calls["std"] += 1
        return real_std(*args, **kwargs)

    def counting_select(*args, **kwargs):
        calls["select"] += 1
        return real_select(*args, **kwargs)

    monkeypatch.setattr(criteria, "masked_std", counting_std)
    monkeypatch.setattr(criteria, "prune_smallest", counting_select)
    pruner = magprune.Pruner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    pruner.prune(magprune.StdThreshold(0.5))
    pruner.prune(magprune.LayerSparsity(0.8))
    pruner.prune(magprune.GlobalSparsity(0.9))
    assert calls == {"std": 500, "select": 501}
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    pruner.check()
    report = magprune.sparsity_report(model, torch.zeros(1, 8))
    assert len(report.rows) == 500 and report.nonzero == round(0.1 * 500 * 64)
    state = pruner.state_dict()
    fresh = magprune.Pruner(Deep(500))
    fresh.load_state_dict(state)
    assert len(fresh.masks) == 500
