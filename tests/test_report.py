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
