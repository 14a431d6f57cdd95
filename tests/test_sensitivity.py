import struct
import zlib

import pytest
import torch

from magprune.analysis.plots import plot_sensitivity, plot_tradeoff, plot_weight_histograms, sample_weights
from magprune.analysis.sensitivity import evaluate_with_targets, sensitivity_scan
from magprune.experiment.config import TrainConfig
from magprune.experiment.data import load_digits_split
from magprune.experiment.demo import DigitsMLP, accuracy
from magprune.experiment.train import Trainer


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train, (x_test, y_test) = load_digits_split(0)
    model = DigitsMLP()
    cfg = TrainConfig(lr=0.05, momentum=0.9, epochs=8, batch_size=32, regularization="none")
    Trainer(model, train, (x_test, y_test), cfg, seed=0).fit()
    return model, (lambda m: accuracy(m, x_test, y_test))


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]  # IHDR chunk intact


def test_scan_gives_one_curve_per_layer_and_leaves_the_model_alone(trained):
    model, evaluate = trained
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grid = [0.0, 0.5, 0.9, 0.99]
    result = sensitivity_scan(model, evaluate, grid)
    assert list(result.curves) == ["fc1", "fc2", "fc3"]
    assert all(len(curve) == len(grid) for curve in result.curves.values())
    assert result.curves["fc1"][0] == result.baseline  # sparsity 0 is the dense model
    assert result.curves["fc1"][-1] < result.baseline  # 99% of fc1 pruned hurts
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert len(result.as_rows()) == 3 * len(grid)


def test_workers_give_the_same_curves(trained):
    model, evaluate = trained
    grid = [0.0, 0.8, 0.95]
    assert sensitivity_scan(model, evaluate, grid, workers=2).curves == sensitivity_scan(model, evaluate, grid).curves


def test_recommendation_meets_the_budget_on_the_model(trained):
    model, evaluate = trained
    result = sensitivity_scan(model, evaluate, [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
    budget = 0.01
    targets = result.recommend(budget, model, evaluate)
    assert set(targets) == {"fc1", "fc2", "fc3"} and max(targets.values()) > 0
    assert result.baseline - evaluate_with_targets(model, evaluate, targets) <= budget
    alone = result.recommend(budget)
    assert all(targets[k] <= alone[k] for k in targets)
    with pytest.raises(ValueError, match="max_drop"):
        result.recommend(-1)


def test_bad_grid():
    model = DigitsMLP()
    with pytest.raises(ValueError, match=r"sparsities\[1\] must be a sparsity"):
        sensitivity_scan(model, lambda m: 1.0, [0.0, 1.0])


def test_figures_are_valid_pngs(trained, tmp_path):
    model, evaluate = trained
    result = sensitivity_scan(model, evaluate, [0.0, 0.5, 0.9])
    assert_png(plot_sensitivity(result, tmp_path / "sens.png"))
    assert_png(plot_tradeoff({"L2 w/ retrain": [(0.5, 0.0), (0.9, 0.01)], "L1 w/o retrain": [(0.5, 0.02)]},
                             tmp_path / "tradeoff.png"))
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    pruned = {n: w * (w.abs() > w.abs().median()) for n, w in weights.items()}
    assert_png(plot_weight_histograms({"dense": weights, "pruned": pruned}, tmp_path / "hist.png"))
    assert_png(plot_tradeoff({"L2 w/o retrain": [(0.5, 0.001), (0.9, 0.4)], "L2 w/ retrain": [(0.9, 0.002)]},
                             tmp_path / "symlog.png"))  # one collapsing curve: the symlog axis
    samples = sample_weights(weights, limit=100)
    assert_png(plot_weight_histograms({"dense": samples}, tmp_path / "sampled.png",
                                      sizes={n: w.numel() for n, w in weights.items()}))
    assert not list(tmp_path.glob("*.tmp"))


def test_weight_samples_are_bounded_strided_copies():
    big, small = torch.arange(1000.0), torch.arange(50.0)
    samples = sample_weights({"big": big, "small": small}, limit=300)
    assert samples["big"].numel() <= 300 and torch.equal(samples["big"], big[::4])  # 1000 / 300 -> every 4th
    assert torch.equal(samples["small"], small)
    samples["small"][0] = 7.0
    assert small[0] == 0.0  # a copy, not a view


def test_tradeoff_curves_on_digits():
    from magprune.analysis.tradeoff import tradeoff_curves

    train, test = load_digits_split(0)

    def config(reg, lr, epochs):
        return TrainConfig(lr=lr, momentum=0.9, epochs=epochs, batch_size=64, regularization=reg, strength=1e-4)

    def make_dense(reg):
        torch.manual_seed(0)
        model = DigitsMLP()
        Trainer(model, train, test, config(reg, 0.05, 6), penalized=[model.fc1.weight, model.fc2.weight,
                                                                     model.fc3.weight]).fit()
        return model

    def retrain(model, pruner, reg):
        trainer = Trainer(model, train, test, config(reg, 0.005, 2), penalized=list(pruner.params.values()))
        handle = pruner.attach(trainer.optimizer)
        trainer.fit()
        handle.remove()

    curves, dense = tradeoff_curves(make_dense, retrain, lambda m: accuracy(m, *test), [0.5, 0.9, 0.97])
    assert set(curves) == {"L1 reg w/o retrain", "L1 reg w/ retrain", "L2 reg w/o retrain", "L2 reg w/ retrain",
                           "L2 reg, iterative prune and retrain"}
    assert all([s for s, _ in points] == [0.5, 0.9, 0.97] for points in curves.values())
    assert set(dense) == {"l1", "l2"}
    # the harshest pruning without retraining costs accuracy, and retraining wins most of it back
    assert curves["L2 reg w/o retrain"][-1][1] > 0.05
    assert curves["L2 reg w/ retrain"][-1][1] < curves["L2 reg w/o retrain"][-1][1]


CONFIG = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "digits-tiny.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from magprune.experiment.config import load_config
    from magprune.experiment.pipeline import run_experiment

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    run_experiment(load_config(CONFIG), run_dir, progress=False, echo=lambda m: None)
    return run_dir


def test_cli_sensitivity_writes_figure_tables_and_a_valid_snippet(tiny_run, tmp_path):
    import json

    import yaml

    from magprune.cli import main
    from magprune.experiment.config import from_dict, load_config

    out = tmp_path / "sens"
    assert main(["sensitivity", str(tiny_run), "--grid", "0,0.5,0.9", "--max-drop", "1", "--out", str(out),
                 "--no-progress"]) == 0
    assert_png(out / "sensitivity.png")
    rows = (out / "sensitivity.csv").read_text().splitlines()
    assert rows[0] == "layer,kind,sparsity,metric,drop" and len(rows) == 1 + 3 * 3
    summary = json.loads((out / "sensitivity.json").read_text())
    assert set(summary["recommended_sparsity"]) == {"fc1", "fc2", "fc3"}
    snippet = yaml.safe_load((out / "recommended.yaml").read_text())
    config = from_dict({**load_config(CONFIG).to_dict(), **snippet})
    assert config.prune[0].criterion == "sparsity"
    assert config.prune[0].sparsity == summary["recommended_sparsity"]
    assert main(["sensitivity", str(tiny_run), "--grid", "0,1.5", "--out", str(out), "--no-progress"]) == 2


def test_cli_tradeoff_writes_figure_and_table(tmp_path):
    from magprune.cli import main

    out = tmp_path / "trade"
    assert main(["tradeoff", str(CONFIG), "--grid", "0.5,0.9", "--out", str(out), "--no-progress",
                 "--set", "train.epochs=1", "--set", "prune.0.retrain.epochs=1"]) == 0
    assert_png(out / "tradeoff.png")
    lines = (out / "tradeoff.csv").read_text().splitlines()
    assert lines[0] == "recipe,sparsity,accuracy_loss" and len(lines) == 1 + 5 * 2


def test_run_report_embeds_its_histograms(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert "![" in report and "(histograms.png)" in report
    assert_png(tiny_run / "histograms.png")
