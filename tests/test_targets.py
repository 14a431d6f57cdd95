"""Which parameters are pruned: default layer types, the registry, patterns, tied weights, error messages."""

import pytest
import torch
from torch import nn

import magprune
from magprune import LayerSparsity, Pruner
from magprune.targets import LAYER_WEIGHTS, layer_weights, register_layer_type


class Conv1D(nn.Module):
    """Shaped like transformers.pytorch_utils.Conv1D (weight stored (in, out)), under the same qualified name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


Conv1D.__module__ = "transformers.pytorch_utils"


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.sep = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.gru = nn.GRU(8, 8, num_layers=2, bidirectional=True)
        self.conv1d = Conv1D(8, 8)
        self.deconv = nn.ConvTranspose2d(2, 3, 3)
        self.norm = nn.LayerNorm(8)
        self.embed = nn.Embedding(10, 8)
        self.bn = nn.BatchNorm2d(3)


def test_default_targets_cover_attention_rnn_and_hf_conv1d_but_no_bias_norm_or_embedding():
    names = list(Pruner(Mixed()).params)
    assert names == [
        "attn.in_proj_weight", "attn.out_proj.weight",
        "sep.q_proj_weight", "sep.k_proj_weight", "sep.v_proj_weight", "sep.out_proj.weight",
        "lstm.weight_ih_l0", "lstm.weight_hh_l0",
        "gru.weight_ih_l0", "gru.weight_hh_l0", "gru.weight_ih_l0_reverse", "gru.weight_hh_l0_reverse",
        "gru.weight_ih_l1", "gru.weight_hh_l1", "gru.weight_ih_l1_reverse", "gru.weight_hh_l1_reverse",
        "conv1d.weight", "deconv.weight"]


def test_biases_of_every_target_type_with_include_bias():
    names = set(Pruner(Mixed(), include_bias=True).params)
    assert {"attn.in_proj_bias", "attn.out_proj.bias", "lstm.bias_ih_l0", "lstm.bias_hh_l0", "conv1d.bias",
            "deconv.bias"} <= names
    assert not any(n.startswith(("norm.", "embed.", "bn.")) for n in names)


def test_patterns_select_only_weights_of_matching_layer_types():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3))
            self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
            self.lstm = nn.LSTM(4, 4)
            self.fc1 = nn.Linear(4, 2)

    net = Net()
    assert list(Pruner(net, ["features.*", "fc1"]).params) == ["features.0.weight", "features.3.weight", "fc1.weight"]
    assert list(Pruner(net, ["encoder.*"]).params) == ["encoder.0.weight"]
    assert list(Pruner(net, ["lstm.*"]).params) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert list(Pruner(net, ["lstm"]).params) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert "lstm.bias_ih_l0" in Pruner(net, ["lstm.*"], include_bias=True).params
    # a parameter named exactly is selected whatever holds it
    assert list(Pruner(net, ["features.1.weight"]).params) == ["features.1.weight"]
    with pytest.raises(ValueError, match=r"'features.1' matches no weight .*BatchNorm2d.*features.1.weight"):
        Pruner(net, ["features.1"])
    with pytest.raises(ValueError, match="include_bias=True"):
        Pruner(net, ["lstm.bias*"])


def test_tied_weight_is_one_target_reachable_by_each_name():
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(20, 8)
            self.body = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.wte.weight

    model = TiedLM()
    assert list(Pruner(model).params) == ["body.weight"]  # the tied embedding only when asked
    by_head = Pruner(model, ["lm_head"])
    assert list(by_head.params) == ["lm_head.weight"] and by_head.params["lm_head.weight"] is model.wte.weight
    assert list(Pruner(model, ["lm_head.weight"]).params) == ["lm_head.weight"]
    assert list(Pruner(model, ["wte.weight"]).params) == ["wte.weight"]
    both = Pruner(model, ["lm_head", "wte.weight", "body"])
    assert list(both.params) == ["lm_head.weight", "body.weight"]  # one target, not two
    both.prune(LayerSparsity(0.5))
    assert int((model.wte.weight == 0).sum()) == 80
    with pytest.raises(ValueError, match=r"tied to an Embedding: name them"):
        Pruner(nn.ModuleDict({"wte": model.wte, "lm_head": model.lm_head}))


def test_no_target_message_names_what_is_there_and_the_options():
    class GPTish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Custom()
            self.ln = nn.LayerNorm(4)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

    with pytest.raises(ValueError, match=r"'Custom': 1.*'LayerNorm': 1.*layer_types=.*register_layer_type") as info:
        Pruner(GPTish())
    assert "Linear" in str(info.value)
    assert list(Pruner(GPTish(), layer_types=(Custom,)).params) == ["block.weight"]


def test_register_layer_type_by_class_or_name(monkeypatch):
    monkeypatch.setattr("magprune.targets.LAYER_WEIGHTS", dict(LAYER_WEIGHTS))

    class Bilinear2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left = nn.Parameter(torch.randn(3, 3))
            self.right = nn.Parameter(torch.randn(3, 3))
            self.bias = nn.Parameter(torch.zeros(3))

    model = nn.Sequential(Bilinear2(), nn.Linear(3, 3))
    assert list(Pruner(model).params) == ["1.weight"]
    register_layer_type(Bilinear2, ("left", "right"))
    assert list(Pruner(model).params) == ["0.left", "0.right", "1.weight"]
    assert layer_weights(model[0]) == ["left", "right"]
    register_layer_type("*.Bilinear2", ("right",))
    assert layer_weights(model[0]) == ["left", "right"]  # both registrations match: the union
    with pytest.raises(TypeError, match="layer_type"):
        register_layer_type(3)
    with pytest.raises(ValueError, match="weights must name"):
        register_layer_type(Bilinear2, ())


def test_layer_types_restrict_and_registry_names_the_weights():
    model = Mixed()
    assert list(Pruner(model, layer_types=(nn.LSTM,)).params) == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    assert list(Pruner(model, layer_types=("transformers.*Conv1D",)).params) == ["conv1d.weight"]
    assert nn.Linear in magprune.DEFAULT_LAYER_TYPES and "transformers.*Conv1D" in magprune.DEFAULT_LAYER_TYPES
