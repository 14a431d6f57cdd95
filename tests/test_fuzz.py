"""Fuzzing with hypothesis: bad configs and command lines get a validation message (exit 2), never a traceback;
valid random configs run end to end on a tiny model."""

import copy
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magprune.cli import main
from magprune.experiment.config import ConfigError, ExperimentConfig, from_dict
from magprune.experiment.pipeline import run_experiment

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs" / "digits-tiny.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["sgd", "adam", "l1", "l2", "std", "han2015", "global",
                                                            "density", "conv", "fc", "inv", "digits", "mnist"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["name", "seed", "model", "data", "train", "prune", "output", "name", "kwargs", "dataset", "lr", "epochs",
        "batch_size", "optimizer", "criterion", "q", "density", "sparsity", "retrain", "freeze", "repeat"]


def paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from paths(value, (*prefix, i))


def mutate(tree, path, value):
    tree = copy.deepcopy(tree)
    if not path:
        return value
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return tree


def validate(raw):
    """from_dict either accepts or raises ConfigError naming a field; nothing else may escape."""
    try:
        return from_dict(raw)
    except ConfigError as exc:
        assert str(exc), "a validation error must say what is wrong"
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=6))
def test_random_configs_validate_or_fail_cleanly(raw):
    validate(raw)


ALL_PATHS = list(paths(BASE))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), values)
def test_mutated_shipped_config_validates_or_fails_cleanly(path, value):
    config = validate(mutate(BASE, path, value))
    assert config is None or isinstance(config, ExperimentConfig)


VERBS = ["run", "report", "demo", "sensitivity", "tradeoff", "export", "bench"]
argv_words = st.one_of(st.sampled_from([*VERBS, "--set", "--resume", "--out", "--force", "--q", "--rounds", "--epochs",
                                        "--retrain-epochs", "--seed", "--data-dir", "--grid", "--max-drop",
                                        "--workers", "--format", "compressed", "shrunk", "--batch-sizes",
                                        "--input-shape", "--repeats", "train.lr=-1", "prune.0.q=x", "nowhere",
                                        "rundir", "bad.safetensors", "meta.safetensors", "kwargs.safetensors",
                                        "-1", "0", "nan", "1,x", "--version", "-h", "=", "train.epochs=1.5"]),
                       st.text(max_size=10))


def _bad_files(where):
    """A config that fails validation, a run directory holding only that config, model files with bad metadata."""
    from safetensors.torch import save_file

    (where / "bad.yaml").write_text("train: {lr: -1}\n")
    (where / "rundir").mkdir(exist_ok=True)
    (where / "rundir" / "config.yaml").write_text("train: {lr: -1}\n")
    tensors = {"w": torch.zeros(2)}
    save_file(tensors, where / "bad.safetensors", metadata={"model": "{not json"})
    save_file(tensors, where / "meta.safetensors", metadata={"model": '{"name": "no-such-net", "kwargs": {}}'})
    save_file(tensors, where / "kwargs.safetensors", metadata={"model": '{"name": "lenet-5", "kwargs": {"x": 1}}'})


def _cli(argv):
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            code = main(argv)
    except SystemExit as exit_:  # argparse: usage errors exit 2, --help/--version exit 0
        code = exit_.code
    return code, err.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from(VERBS), st.lists(argv_words, max_size=5))
def test_random_command_lines_of_every_verb_never_trace_back(tmp_path, monkeypatch, verb, words):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path)
    argv = [verb, *[("bad.yaml" if word == "nowhere" and i == 0 else word) for i, word in enumerate(words)]]
    if verb == "demo" and "-h" not in argv and "--help" not in argv:
        argv = [*argv, "--epochs", "-1"]  # keep any demo invalid: fuzzing must not train for real
    code, err = _cli(argv)
    assert code in (0, 2), (argv, code, err[-300:])
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["bench", "bad.safetensors"], "does not name a registered model"),
    (["bench", "meta.safetensors"], "does not name a registered model"),
    (["bench", "kwargs.safetensors"], "does not name a registered model"),
    (["demo", "--epochs", "-1"], "epochs must be an integer >= 1"),
    (["demo", "--q", "nan"], "q must be a finite quality parameter"),
    (["demo", "--rounds", "0"], "rounds must be an integer >= 1"),
    (["demo", "--seed", "-3"], "seed must be an integer >= 0"),
])
def test_known_bad_inputs_end_in_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    _bad_files(tmp_path)
    code, err = _cli(argv)
    assert code == 2 and message in err and "Traceback" not in err, err[-500:]


@st.composite
def valid_configs(draw):
    step = st.one_of(
        st.fixed_dictionaries({"criterion": st.just("std"), "q": st.floats(0.0, 1.5)}),
        st.fixed_dictionaries({"criterion": st.just("sparsity"), "sparsity": st.floats(0.0, 0.95)}),
        st.fixed_dictionaries({"criterion": st.just("global"), "sparsity": st.floats(0.0, 0.95)}),
        st.fixed_dictionaries({"criterion": st.just("density"),
                               "density": st.fixed_dictionaries({"fc1": st.floats(0.01, 1.0)})}),
        st.fixed_dictionaries({"criterion": st.just("han2015")}),
    )
    steps = draw(st.lists(step, max_size=2))
    for s in steps:
        s["retrain"] = {"epochs": draw(st.integers(0, 1)), "lr_fraction": draw(st.sampled_from([0.1, 1.0])),
                        "freeze": "none"}  # an MLP has no conv layers, and freezing its fc layers leaves nothing
    return {
        "name": "fuzz", "seed": draw(st.integers(0, 2**31)),
        "model": {"name": "lenet-300-100", "kwargs": {"in_features": 64}},
        "data": {"dataset": "digits"},
        "train": {"optimizer": draw(st.sampled_from(["sgd", "adam"])), "lr": draw(st.sampled_from([0.01, 0.05])),
                  "epochs": draw(st.integers(0, 1)), "batch_size": draw(st.sampled_from([32, 256, 5000])),
                  "regularization": draw(st.sampled_from(["none", "l1", "l2"])),
                  "dropout": draw(st.sampled_from([0.0, 0.3])),
                  "lr_schedule": {"policy": draw(st.sampled_from(["constant", "inv", "step", "cosine"]))}},
        "prune": steps,
        "output": {"checkpoints": draw(st.booleans())},
    }


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(valid_configs())
def test_valid_random_configs_run_on_a_tiny_model(tmp_path_factory, raw):
    config = from_dict(raw)
    run_dir = tmp_path_factory.mktemp("fuzzrun")
    summary = run_experiment(config, run_dir, progress=False, echo=lambda message: None)
    assert 0.0 <= summary["error_after"] <= 1.0
    assert summary["sparsity"] == pytest.approx(
        1 - summary["report"]["total"]["nonzero"] / summary["report"]["total"]["weights"], abs=1e-6)
    assert (run_dir / "report.md").is_file() and (run_dir / "model.safetensors").is_file()
