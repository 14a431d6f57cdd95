"""Pipeline and CLI end to end on the bundled digits: run directory contents, reported sparsity, determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from in_process import run_cli
from safetensors.torch import load_file
from test_data import make_fake_mnist

from magprune.experiment.config import ConfigError, from_dict, load_config
from magprune.experiment.pipeline import load_run, run_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits-tiny.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
RUN_FILES = {"config.yaml", "metrics.jsonl", "metrics.csv", "checkpoints", "model.safetensors", "masks.safetensors",
             "summary.json", "report.md"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magprune.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_cli_run_writes_the_run_directory_and_report(tmp_path):
    run_dir = tmp_path / "run"
    done = cli("run", str(TINY), "--out", str(run_dir), "--no-progress", "--set", "train.epochs=2")
    assert done.returncode == 0, done.stderr
    assert {p.name for p in run_dir.iterdir()} >= RUN_FILES
    assert {"dense.safetensors", "dense.json", "step-1.safetensors", "step-2.json"} <= {
        p.name for p in (run_dir / "checkpoints").iterdir()}

    model, masks, config = load_run(run_dir)
    assert config.train.epochs == 2 and config.model.kwargs == {"in_features": 64}
    summary = json.loads((run_dir / "summary.json").read_text())
    # the reported sparsity is the model's: count zeros in the saved weights
    for layer in summary["report"]["layers"]:
        weight = getattr(model, layer["layer"]).weight
        assert layer["nonzero"] == int(weight.count_nonzero())
        assert not weight[~masks[layer["layer"] + ".weight"]].any()
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert summary["sparsity"] == pytest.approx(zeros / sum(m.numel() for m in masks.values()))
    state = load_file(run_dir / "model.safetensors")
    assert set(state) == set(model.state_dict())  # plain keys, no weight_orig
    total = sum(int(v.count_nonzero()) for v in state.values())
    assert summary["params_after"] == total
    assert summary["compression"] == pytest.approx(summary["params_before"] / total)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["dense"] * 2 + ["prune-1"] + ["retrain-1"] * 2 + ["prune-2", "retrain-2"]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("stage,step,epoch") and len(csv_lines) == len(rows) + 1

    report = (run_dir / "report.md").read_text()
    assert "| layer | weights | FLOP | % weights kept | % FLOP kept |" in report
    assert f"{summary['compression']:.1f}x" in report
    shown = cli("report", str(run_dir))
    assert shown.returncode == 0 and shown.stdout.strip() == report.strip()


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    from magprune.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    done = cli("run", str(bad), "--out", str(tmp_path / "r"))  # the real entry point, once
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "train.lr" in done.stderr and "-1" in done.stderr

    def run(*args: str) -> tuple[int, str]:  # the rest in process
        done = run_cli(*args)
        return done.returncode, done.stderr

    code, err = run("run", str(TINY), "--set", "prune.0.criterion=magic", "--out", str(tmp_path / "r"))
    assert code == 2 and "prune[0].criterion" in err and err.strip().count("\n") == 0
    code, err = run("run", str(TINY), "--set", "data.dataset=mnist", "--data-dir", str(tmp_path), "--out",
                    str(tmp_path / "r2"))
    assert code == 2 and str(tmp_path) in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "r2").exists()  # nothing written when the data is missing
    code, err = run("report", str(tmp_path))
    assert code == 2 and "summary.json" in err
    for command in ([], ["run"], ["report"], ["demo"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0 and "usage: magprune" in capsys.readouterr().out


def test_two_runs_with_one_seed_give_identical_metrics(tmp_path):
    config = load_config(TINY, ["train.epochs=2"])
    runs = []
    for name in ("a", "b"):
        run_experiment(config, tmp_path / name, progress=False, echo=lambda _: None)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert runs[0] == runs[1]
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different seed really changes the run, so the comparison above can fail
    other = from_dict({**config.to_dict(), "seed": 1})
    run_experiment(other, tmp_path / "c", progress=False, echo=lambda _: None)
    assert (tmp_path / "c" / "metrics.jsonl").read_text() != (tmp_path / "a" / "metrics.jsonl").read_text()


def test_global_criterion_sparsity_targets_and_dropout(tmp_path):
    config = from_dict({
        "model": {"name": "lenet-300-100", "kwargs": {"in_features": 64}}, "data": {"dataset": "digits"},
        "train": {"epochs": 1, "lr": 0.05, "dropout": 0.5},
        "prune": [{"criterion": "global", "sparsity": 0.8, "retrain": {"epochs": 1}},
                  {"criterion": "sparsity", "sparsity": {"fc1": 0.9}, "retrain": {"epochs": 1}}],
        "output": {"checkpoints": False}})
    summary = run_experiment(config, tmp_path, progress=False, echo=lambda _: None)
    # no per-stage checkpoints (a resume checkpoint may still be kept there)
    assert not list(tmp_path.glob("checkpoints/*.safetensors"))
    layers = {row["layer"]: row for row in summary["report"]["layers"]}
    assert layers["fc1"]["density"] == pytest.approx(0.1, abs=1e-4)
    model, _, _ = load_run(tmp_path)
    assert model.drop1.p == 0.5  # the saved model rebuilds with its original dropout
    assert summary["steps"][0]["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_freeze_conv_keeps_conv_weights_while_fc_retrains(tmp_path):
    make_fake_mnist(tmp_path / "mnist", n=64)
    config = from_dict({
        "model": {"name": "lenet-5"}, "data": {"dataset": "mnist", "dir": str(tmp_path / "mnist")},
        "train": {"epochs": 1, "batch_size": 32},
        "prune": [{"criterion": "han2015", "retrain": {"epochs": 1, "freeze": "conv"}}]})
    run_experiment(config, tmp_path / "run", progress=False, echo=lambda _: None)
    pruned = load_file(tmp_path / "run" / "checkpoints" / "dense.safetensors")
    final = load_file(tmp_path / "run" / "model.safetensors")
    masks = load_file(tmp_path / "run" / "masks.safetensors")
    # conv weights are the dense ones with the pruned entries zeroed: frozen while fc retrained
    assert torch.equal(final["conv1.weight"], pruned["model.conv1.weight"] * masks["conv1.weight"])
    kept = masks["fc1.weight"]
    assert not torch.equal(final["fc1.weight"][kept], pruned["model.fc1.weight"][kept])
    mlp = from_dict({**config.to_dict(), "model": {"name": "lenet-300-100"},
                     "prune": [{"criterion": "std", "q": 1.0, "retrain": {"freeze": "fc"}}]})
    with pytest.raises(ConfigError, match=r"prune\[0\]\.retrain\.freeze: freezing the 'fc' layers"):
        run_experiment(mlp, tmp_path / "mlp", progress=False, echo=lambda _: None)


def test_retrain_compute_sparse_matches_dense_retraining(tmp_path):
    dense = load_config(TINY)
    sparse = from_dict({**dense.to_dict(), "prune": [
        {**step, "retrain": {**step["retrain"], "compute": "sparse"}} for step in dense.to_dict()["prune"]]})
    assert [s.retrain.compute for s in sparse.prune] == ["sparse", "sparse"]
    summaries = {name: run_experiment(config, tmp_path / name, progress=False, echo=lambda _: None)
                 for name, config in (("dense", dense), ("sparse", sparse))}
    assert summaries["sparse"]["sparsity"] == pytest.approx(summaries["dense"]["sparsity"], abs=1e-3)
    assert summaries["sparse"]["error_after"] == pytest.approx(summaries["dense"]["error_after"], abs=3 / 449)
    model, masks, _ = load_run(tmp_path / "sparse")
    state = load_file(tmp_path / "sparse" / "model.safetensors")
    assert set(state) == set(model.state_dict())  # plain keys: the compact weights were written back
    for name, mask in masks.items():
        assert not state[name][~mask].any()


def test_retrain_compute_sparse_refuses_freezing_the_fc_layers():
    with pytest.raises(ConfigError, match=r"prune\[0\]\.retrain: compute 'sparse'"):
        from_dict({"prune": [{"criterion": "std", "q": 1.0, "retrain": {"compute": "sparse", "freeze": "fc"}}]})
    with pytest.raises(ConfigError, match=r"prune\[0\]\.retrain\.compute: must be one of \['dense', 'sparse'\]"):
        from_dict({"prune": [{"criterion": "std", "q": 1.0, "retrain": {"compute": "fast"}}]})


def test_repeat_expands_into_one_stage_per_prune_step():
    from magprune.experiment.stages import build_stages

    config = from_dict({"prune": [{"criterion": "std", "q": 0.5, "repeat": 3}, {"criterion": "han2015"}]})
    assert [s.name for s in build_stages(config)] == ["dense", "step-1", "step-2", "step-3", "step-4"]


def test_a_new_stage_plugs_into_the_driver_and_gets_its_state_back_on_resume(tmp_path, monkeypatch):
    """What the stages module docstring promises a new stage (a quantize stage, later): its checkpointed state
    comes back on resume, finished stages are not repeated, and its results reach the context."""
    from magprune.experiment import pipeline
    from magprune.experiment.stages import Stage, build_stages

    calls = []

    class Count(Stage):
        name = "count"

        def run(self, ctx, state):
            calls.append(state)
            for done in range((state or {"done": 0})["done"], 3):
                ctx.checkpoint({"done": done + 1})
                if done == 1 and state is None:
                    raise KeyboardInterrupt  # "crash" after the second checkpoint
            ctx.results["count"] = 3

    monkeypatch.setattr(pipeline, "build_stages", lambda config: [*build_stages(config), Count()])
    config = load_config(TINY, ["train.epochs=1", "prune=[]"])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path, progress=False, echo=lambda _: None)
    messages = []
    run_experiment(config, tmp_path, progress=False, echo=messages.append, resume=True)  # the lock was released
    assert calls == [None, {"done": 2}]
    assert f"resuming {tmp_path} at count" in messages
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["dense"]  # dense training was done before the crash: not repeated
    saved = torch.load(tmp_path / "checkpoints" / "resume.pt", weights_only=True)
    assert saved["position"] == {"stage": 2, "state": None} and saved["results"]["count"] == 3


def test_resume_refuses_a_checkpoint_written_for_other_stages(tmp_path):
    from magprune.experiment.pipeline import RunError

    config = load_config(TINY, ["train.epochs=1", "prune.0.retrain.epochs=0", "prune.1.retrain.epochs=0"])
    run_experiment(config, tmp_path, progress=False, echo=lambda _: None)
    fewer = from_dict({**config.to_dict(), "prune": config.to_dict()["prune"][:1]})
    with pytest.raises(RunError, match=r"stages \['dense', 'step-1', 'step-2'\], the config now gives "
                                       r"\['dense', 'step-1'\]"):
        run_experiment(fewer, tmp_path, progress=False, echo=lambda _: None, resume=True)


def test_each_network_is_evaluated_once_at_the_end_of_its_training(tmp_path, monkeypatch):
    # the last epoch's test and validation errors are the stage's: no second pass over either split
    from magprune.experiment import stages, train

    sizes: list[int] = []

    def counting(model, x, y, batch_size=2000):
        sizes.append(len(y))
        return real(model, x, y, batch_size)

    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", counting)
    monkeypatch.setattr(stages, "evaluate", counting)
    raw = yaml_of(TINY)
    raw["train"]["epochs"] = 2
    raw["prune"] = raw["prune"][:1]
    raw["prune"][0]["retrain"]["epochs"] = 2
    raw["data"]["validation"] = 150
    summary = run_experiment(from_dict(raw), tmp_path / "run", progress=False, echo=lambda _: None)
    assert sizes.count(150) == 4  # validation: once per epoch (2 dense + 2 retraining), was 7
    assert sizes.count(449) == 5  # test: once per epoch and once right after the prune, was 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["epoch"] is not None][-1]
    assert summary["error_after"] == last["test_error"]
    assert summary["validation_error_after"] == last["validation_error"]

    class Scramble(stages.Stage):  # a stage after the last training that changes the model: evaluated again
        name = "scramble"

        def run(self, ctx, state):
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.mul_(-1.0)

    from magprune.experiment import pipeline

    monkeypatch.setattr(pipeline, "build_stages", lambda config: [*stages.build_stages(config), Scramble()])
    sizes.clear()
    scrambled = run_experiment(from_dict(raw), tmp_path / "scrambled", progress=False, echo=lambda _: None)
    assert sizes.count(150) == 5 and sizes.count(449) == 6
    assert scrambled["error_after"] > summary["error_after"] + 0.3  # the scrambled network's, not the last epoch's


def test_validation_split_is_held_out_and_reported(tmp_path):
    raw = yaml_of(TINY)
    raw["train"]["epochs"] = 1
    raw["prune"] = raw["prune"][:1]
    raw["prune"][0]["retrain"]["epochs"] = 1
    raw["data"]["validation"] = 150
    lines: list[str] = []
    summary = run_experiment(from_dict(raw), tmp_path / "run", progress=False, echo=lines.append)
    # digits: 1797 images, 449 test, 1348 train of which the last 150 are held out
    assert "(1198 train / 150 validation / 449 test)" in lines[0]
    assert summary["validation"] == 150
    for key in ("validation_error_before", "validation_error_after"):
        assert 0 <= summary[key] <= 1 and round(summary[key] * 150) == pytest.approx(summary[key] * 150)
    assert "Validation error (the last 150 training images, held out)" in (tmp_path / "run" / "report.md").read_text()
    # every epoch's row and log line carry the validation error (the one a recipe is chosen on); the last one is
    # the final network's
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["epoch"] is not None]
    assert [r["stage"] for r in epochs] == ["dense", "retrain-1"]
    assert all(0 <= r["validation_error"] <= 1 for r in epochs)
    assert epochs[-1]["validation_error"] == pytest.approx(summary["validation_error_after"])
    assert "validation_error" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert sum(" epoch " in line and "validation error" in line and "test error" in line for line in lines) == 2
    without = run_experiment(from_dict({**raw, "data": {"dataset": "digits"}}), tmp_path / "run0", progress=False,
                             echo=lines.append)
    assert without["validation_error_after"] is None
    assert "Validation error" not in (tmp_path / "run0" / "report.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "run0" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["validation_error"] is None for r in rows)
    raw["data"]["validation"] = 1348
    with pytest.raises(ConfigError, match="data.validation: must hold out fewer than the 1348"):
        run_experiment(from_dict(raw), tmp_path / "run1", progress=False, echo=lines.append)


def yaml_of(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_channels_last_trains_like_the_default_layout(tmp_path):
    make_fake_mnist(tmp_path / "mnist", n=64)
    runs = {}
    for flag in (False, True):
        config = from_dict({
            "model": {"name": "lenet-5"}, "data": {"dataset": "mnist", "dir": str(tmp_path / "mnist")},
            "train": {"epochs": 2, "batch_size": 16, "channels_last": flag},
            "prune": [{"criterion": "han2015", "retrain": {"epochs": 1}}]})
        summary = run_experiment(config, tmp_path / f"run-{flag}", progress=False, echo=lambda _: None)
        runs[flag] = (summary, load_file(tmp_path / f"run-{flag}" / "model.safetensors"),
                      load_file(tmp_path / f"run-{flag}" / "masks.safetensors"))
    (plain, plain_w, plain_m), (cl, cl_w, cl_m) = runs[False], runs[True]
    assert cl_w.keys() == plain_w.keys()
    for name, weight in plain_w.items():  # the same training, up to the convolutions' float rounding
        torch.testing.assert_close(cl_w[name], weight, atol=1e-4, rtol=1e-3)
    for name, mask in cl_m.items():
        assert torch.equal(mask, plain_m[name])
        assert bool((cl_w[name][~mask] == 0).all())  # pruned entries exactly zero in the NHWC weights too
    assert cl["error_after"] == pytest.approx(plain["error_after"], abs=1 / 64)


def test_model_weights_start_a_run_from_a_trained_model(tmp_path):
    base = load_config(TINY).to_dict()
    dense = run_experiment(from_dict({**base, "prune": []}), tmp_path / "dense", progress=False, echo=lambda _: None)
    weights = tmp_path / "dense" / "model.safetensors"
    # no dense epochs: the run prunes and retrains the given weights, starting from their error
    config = from_dict({**base, "model": {**base["model"], "weights": str(weights)},
                        "train": {**base["train"], "epochs": 0}})
    summary = run_experiment(config, tmp_path / "pruned", progress=False, echo=lambda _: None)
    assert summary["error_before"] == dense["error_after"]
    assert summary["error_after"] != summary["error_before"]
    # a run's dense checkpoint (its keys under "model.") starts the same run
    checkpoint = from_dict({**config.to_dict(), "model": {
        **base["model"], "weights": str(tmp_path / "pruned" / "checkpoints" / "dense.safetensors")}})
    again = run_experiment(checkpoint, tmp_path / "again", progress=False, echo=lambda _: None)
    assert again["error_before"] == dense["error_after"] and again["error_after"] == summary["error_after"]
    for path, message in [(tmp_path / "missing.safetensors", "is not a file"),
                          (tmp_path / "dense" / "config.yaml", "is not a safetensors file")]:
        bad = from_dict({**config.to_dict(), "model": {**base["model"], "weights": str(path)}})
        with pytest.raises(ConfigError, match=f"model.weights: .*{message}"):
            run_experiment(bad, tmp_path / "bad", progress=False, echo=lambda _: None)
        assert not (tmp_path / "bad").exists()  # nothing written for a run that cannot start
    other = from_dict({**config.to_dict(), "model": {"name": "lenet-300-100", "weights": str(weights)}})
    with pytest.raises(ConfigError, match="model.weights: .* does not fit the model"):
        run_experiment(other, tmp_path / "other", progress=False, echo=lambda _: None)
