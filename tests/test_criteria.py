import pytest
import torch

from magprune import chunked
from magprune.criteria import (
    HAN2015_DENSITIES,
    GlobalSparsity,
    LayerSparsity,
    StdThreshold,
    han2015,
    kth_smallest_magnitude,
    masked_std,
    prune_smallest,
)


def test_std_threshold_hand_computed():
    w = torch.tensor([[1.0, -2.0], [3.0, -4.0]])  # std (unbiased) of [1,-2,3,-4] = sqrt(29/3 - ...)
    std = torch.tensor([1.0, -2.0, 3.0, -4.0]).std().item()
    assert masked_std(w) == pytest.approx(std)
    keep = StdThreshold(0.9)({"a.weight": w}, {})["a.weight"]
    # threshold 0.9 * 3.304 = 2.97: |1| and |-2| pruned, 3 and -4 kept
    assert keep.tolist() == [[False, False], [True, True]]
    # q = 0 keeps everything; the threshold rule is |w| >= q * std
    assert StdThreshold(0.0)({"a.weight": w}, {})["a.weight"].all()


def test_std_uses_remaining_weights_so_repeats_raise_the_threshold():
    w = torch.tensor([0.1, -0.2, 1.0, -1.5, 2.0])
    mask = torch.tensor([False, False, True, True, True])
    assert masked_std(w, mask) == pytest.approx(torch.tensor([1.0, -1.5, 2.0]).std().item())
    crit = StdThreshold(0.5)
    first = crit.thresholds({"w": w}, {})["w"]
    second = crit.thresholds({"w": w * mask}, {"w": mask})["w"]
    assert second > first


def test_std_threshold_per_layer_q_by_module_name():
    weights = {"fc1.weight": torch.randn(50, 50), "fc2.weight": torch.randn(10, 50)}
    out = StdThreshold({"fc1": 1.0})(weights, {})
    assert list(out) == ["fc1.weight"]
    assert 0.25 < out["fc1.weight"].float().mean() < 0.40  # ~32% of a Gaussian lies beyond 1 std


def test_layer_sparsity_exact_count_and_ties_by_position():
    w = torch.tensor([0.5, -0.1, 0.3, -0.2])
    assert LayerSparsity(0.5)({"w": w}, {})["w"].tolist() == [True, False, True, False]
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    assert LayerSparsity(0.4)({"w": ties}, {})["w"].tolist() == [False, False, True, True, True]
    w = torch.randn(37, 11)
    keep = LayerSparsity({"w": 0.3})({"w": w}, {})["w"]
    assert int((~keep).sum()) == round(0.3 * w.numel())
    assert w[~keep].abs().max() <= w[keep].abs().min()


def test_layer_sparsity_from_densities_and_han_presets():
    assert HAN2015_DENSITIES["lenet-300-100"] == {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26}
    assert HAN2015_DENSITIES["lenet-5"] == {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19}
    crit = han2015("lenet-300-100")
    assert crit.sparsity == pytest.approx({"fc1": 0.92, "fc2": 0.91, "fc3": 0.74})
    weights = {"fc1.weight": torch.randn(300, 784), "fc2.weight": torch.randn(100, 300),
               "fc3.weight": torch.randn(10, 100)}
    kept = {k: v.float().mean().item() for k, v in crit(weights, {}).items()}
    assert kept == pytest.approx({"fc1.weight": 0.08, "fc2.weight": 0.09, "fc3.weight": 0.26}, abs=1e-3)
    with pytest.raises(ValueError, match="network must be one of"):
        han2015("alexnet-v9")
    with pytest.raises(ValueError, match=r"density\['fc1'\] must be a fraction of weights kept in \(0, 1\]"):
        LayerSparsity.from_densities({"fc1": 0.0})


def test_global_sparsity_matches_a_sort_across_layers(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK", 64)  # force many chunks per tensor
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(7, generator=g) * 3,
               "c": torch.randn(5, 5, 5, generator=g) * 0.1}
    out = GlobalSparsity(0.6)(weights, {})
    flat = torch.cat([w.reshape(-1) for w in weights.values()]).abs()
    k = round(0.6 * flat.numel())
    threshold = flat.sort().values[k - 1]
    for name, w in weights.items():
        assert torch.equal(out[name], w.abs() > threshold)
    assert sum(int((~m).sum()) for m in out.values()) == k
    only = GlobalSparsity(0.5, layers=["a", "b"])(weights, {})
    assert set(only) == {"a", "b"}


def test_global_sparsity_hand_case_with_ties_across_tensors():
    weights = {"x": torch.tensor([3.0, 1.0]), "y": torch.tensor([1.0, 5.0, 0.5])}
    out = GlobalSparsity(0.4)(weights, {})  # k = 2: 0.5, then the first of the tied 1.0s
    assert out["x"].tolist() == [True, False]
    assert out["y"].tolist() == [True, True, False]


@pytest.mark.parametrize("chunk", [100, 1 << 18])  # radix histograms over chunks / one-chunk kthvalue path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_smallest_magnitude_matches_kthvalue(monkeypatch, dtype, chunk):
    monkeypatch.setattr(chunked, "CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(123, generator=g).to(dtype), torch.randn(10, 9, generator=g).to(dtype)]
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    for k in (1, 17, 100, flat.numel()):
        bits, below = kth_smallest_magnitude(tensors, k)
        value = torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
        assert value == flat.kthvalue(k).values.item()
        assert below == int((flat < value).sum())
    assert all(m.all() for m in prune_smallest(tensors, 0))


def test_bad_arguments_name_the_argument():
    for bad in (1.0, -0.1, 1.5, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be a sparsity .* in \[0, 1\)"):
            LayerSparsity(bad)
        with pytest.raises(ValueError, match=r"sparsity must be a sparsity"):
            GlobalSparsity(bad)
    with pytest.raises(ValueError, match=r"sparsity\['fc1'\] must be"):
        LayerSparsity({"fc1": 2})
    for bad in (-1, float("inf"), "1"):
        with pytest.raises(ValueError, match=r"q must be a finite quality parameter q >= 0"):
            StdThreshold(bad)
    with pytest.raises(ValueError, match="sparsity: unknown layer 'fc9'; allowed: \\['fc1.weight'\\]"):
        LayerSparsity({"fc9": 0.5})({"fc1.weight": torch.ones(3)}, {})
    with pytest.raises(ValueError, match="q: unknown layer"):
        StdThreshold({"fc9": 1.0})({"fc1.weight": torch.ones(3)}, {})
    with pytest.raises(ValueError, match="nothing to prune"):
        GlobalSparsity(0.5)({}, {})
    with pytest.raises(ValueError, match="nothing to prune"):
        LayerSparsity({})
    with pytest.raises(ValueError, match="NaN or infinity"):
        GlobalSparsity(0.5)({"w": torch.tensor([1.0, float("nan")])}, {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("criterion", [StdThreshold(1.0), LayerSparsity(0.5), GlobalSparsity(0.5)])
def test_nan_or_inf_weights_raise_naming_the_layer(criterion, bad):
    weights = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 4)}
    weights["b.weight"][1, 2] = bad
    with pytest.raises(ValueError, match="b.weight: weights contain NaN or infinity"):
        criterion(weights, {})
