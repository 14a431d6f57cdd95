import pytest
import torch
from torch import nn

from magprune import Pruner, han2015, sparsity_report


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_flops_and_weights_match_han_table_3():
    report = sparsity_report(LeNet5(), torch.zeros(4, 1, 28, 28))
    rows = {r.layer: (r.weights, r.flops) for r in report.rows}
    assert rows == {"conv1": (500, 576_000), "conv2": (25_000, 3_200_000), "fc1": (400_000, 800_000),
                    "fc2": (5_000, 10_000)}
    assert report.weights == 430_500 and report.flops == 4_586_000


def test_report_after_han_densities_lenet_300_100():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(784, 300))
    model.add_module("relu1", nn.ReLU())
    model.add_module("fc2", nn.Linear(300, 100))
    model.add_module("relu2", nn.ReLU())
    model.add_module("fc3", nn.Linear(100, 10))
    Pruner(model).prune(han2015("lenet-300-100"))
    report = sparsity_report(model, torch.zeros(1, 784))
    d = report.as_dict()
    assert [row["flops"] for row in d["layers"]] == [470_400, 60_000, 2_000]
    assert [row["nonzero"] for row in d["layers"]] == [round(0.08 * 235_200), round(0.09 * 30_000), 260]
    assert d["total"]["weights"] == 266_200
    assert report.compression == pytest.approx(266_200 / report.nonzero)
    assert report.params_total == 266_610
    assert report.params_compression == pytest.approx(266_610 / (report.nonzero + 410), rel=1e-3)
    assert d["layers"][0]["remaining_flops"] == round(470_400 * d["layers"][0]["density"])
    text = report.to_text()
    assert "fc1" in text and "8.0%" in text and "total" in text and "x)" in text


def test_report_without_input_has_no_flops_and_unknown_layer_errors():
    report = sparsity_report(LeNet5())
    assert report.flops is None and "-" in report.to_text()
    with pytest.raises(ValueError, match="layers: unknown"):
        sparsity_report(LeNet5(), layers=["fc9"])


def test_registry_lenets_match_the_paper_counts():
    from magprune import create_model, list_models

    assert {"lenet-300-100", "lenet-5"} <= set(list_models())
    lenet5 = sparsity_report(create_model("lenet-5"), torch.zeros(2, 1, 28, 28))
    assert lenet5.weights == 430_500 and lenet5.flops == 4_586_000
    mlp = sparsity_report(create_model("lenet-300-100"), torch.zeros(2, 1, 28, 28))
    assert mlp.weights == 266_200 and mlp.flops == 532_400
    with pytest.raises(ValueError, match="model must be one of"):
        create_model("resnet-9000")


def test_report_counts_attention_rnn_and_hf_conv1d_weights_and_flops_from_a_dict_input():
    from test_targets import Conv1D

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 4, batch_first=True)
            self.proj = Conv1D(6, 4)  # transformers' layout: weight (in=4, out=6)

        def forward(self, tokens, scale=1.0):
            h = self.attn(tokens, tokens, tokens, need_weights=False)[0]
            return self.proj(self.lstm(h * scale)[0])

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.attn.in_proj_weight[:5] = 0.0
    report = sparsity_report(model, {"tokens": torch.randn(3, 5, 8), "scale": 2.0})
    rows = {r.layer: r for r in report.rows}
    assert list(rows) == ["attn", "attn.out_proj", "lstm", "proj"]
    assert (rows["attn"].weights, rows["attn"].nonzero) == (192, 192 - 5 * 8)
    assert rows["lstm"].weights == 16 * 8 + 16 * 4 and rows["proj"].weights == 24
    tokens = 5  # per sample: each weight one multiply-add per token, 2 FLOPs each
    assert rows["attn"].flops == 2 * 192 * tokens and rows["attn.out_proj"].flops == 2 * 64 * tokens
    assert rows["lstm"].flops == 2 * 192 * tokens and rows["proj"].flops == 2 * 24 * tokens
    assert report.weights == 192 + 64 + 192 + 24


def _hand_net() -> nn.Sequential:
    """fc1 keeps 2 of 6 weights (its third neuron pruned away), fc2 keeps 6 of 9: small enough to count by hand."""
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(2, 3, bias=False))
    model.add_module("relu", nn.ReLU())
    model.add_module("fc2", nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.fc2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))
    return model


def test_activation_density_and_han_flops_by_hand():
    from magprune.report import activation_density

    model = _hand_net()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # hidden after ReLU: [1, 0, 0] and [0, 1, 0] -> 2 of 6 nonzero; fc1's input is the data: dense by Han's count
    densities = activation_density(model, x, batch_size=1)
    assert densities == {"fc1": 1.0, "fc2": pytest.approx(1 / 3)}
    assert activation_density(model, x, count_data_zeros=True) == {"fc1": 0.5, "fc2": pytest.approx(1 / 3)}
    report = sparsity_report(model, x[:1]).with_input_density(densities)
    rows = {r.layer: r for r in report.rows}
    # FLOPs: fc1 2 x 6 = 12, fc2 2 x 9 = 18. Weight-only: 12 x 2/6 = 4, 18 x 6/9 = 12. Han: 4 x 1, 12 x 1/3 = 4.
    assert (rows["fc1"].flops, rows["fc1"].remaining_flops, rows["fc1"].han_flops) == (12, 4, 4)
    assert (rows["fc2"].flops, rows["fc2"].remaining_flops, rows["fc2"].han_flops) == (18, 12, 4)
    assert (report.flops, report.remaining_flops, report.han_flops) == (30, 16, 8)
    total = report.as_dict()["total"]
    assert total["han_flops"] == 8 and report.as_dict()["layers"][1]["input_density"] == pytest.approx(1 / 3)
    header = report.to_text().splitlines()[0]
    assert "% FLOP kept (Han)" in header and "input density" in header
    assert "% FLOP kept (Han)" not in sparsity_report(model, x[:1]).to_text()  # only when measured
    assert model.training  # mode restored


def test_activation_density_refuses_unknown_layers_and_bad_batch():
    from magprune.report import activation_density

    with pytest.raises(ValueError, match="layers: unknown"):
        activation_density(_hand_net(), torch.ones(2, 2), layers=["fc9"])
    with pytest.raises(ValueError, match="batch_size"):
        activation_density(_hand_net(), torch.ones(2, 2), batch_size=0)
