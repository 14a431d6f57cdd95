"""Experiment config: validation errors name the field, the bad value and what is allowed; --set overrides."""

from pathlib import Path

import pytest

from magprune.experiment.config import ConfigError, apply_overrides, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    for path in paths:
        config = load_config(path)
        assert config.prune, path


@pytest.mark.parametrize("net", ["lenet-300-100", "lenet-5"])
def test_fashion_mnist_configs_are_the_mnist_ones_with_another_dataset(net):
    """The second dataset shows the method is not tuned to MNIST only if the recipe is the same one."""
    mnist = load_config(CONFIGS / f"{net}-mnist.yaml").to_dict()
    fashion = load_config(CONFIGS / f"{net}-fashion-mnist.yaml").to_dict()
    assert fashion["data"]["dataset"] == "fashion-mnist" and fashion["name"] == f"{net}-fashion-mnist"
    for config in (mnist, fashion):
        del config["name"], config["data"]["dataset"]
    assert fashion == mnist


def test_the_long_lenet5_frontier_differs_from_the_frontier_only_in_its_retraining_epochs():
    short = load_config(CONFIGS / "lenet-5-mnist-frontier.yaml").to_dict()
    long = load_config(CONFIGS / "lenet-5-mnist-frontier-long.yaml").to_dict()
    assert [step["retrain"]["epochs"] for step in short["prune"]] == [5] * 7
    assert [step["retrain"]["epochs"] for step in long["prune"]] == [10] * 7
    for config in (short, long):
        del config["name"]
        for step in config["prune"]:
            del step["retrain"]["epochs"]
    assert long == short


@pytest.mark.parametrize(("raw", "field", "value", "allowed"), [
    ({"train": {"lr": -0.1}}, "train.lr", "-0.1", "a number in (0.0"),
    ({"train": {"optimizer": "rmsprop"}}, "train.optimizer", "'rmsprop'", "['sgd', 'adam']"),
    ({"train": {"distributed": "deepspeed"}}, "train.distributed", "'deepspeed'", "['ddp', 'fsdp']"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "2.5", "an integer"),
    ({"train": {"lr_schedule": {"policy": "poly"}}}, "train.lr_schedule.policy", "'poly'", "'inv'"),
    ({"model": {"name": "resnet"}}, "model.name", "'resnet'", "'lenet-5'"),
    ({"data": {"dataset": "cifar"}}, "data.dataset", "'cifar'", "'mnist'"),
    ({"prune": [{"criterion": "magic"}]}, "prune[0].criterion", "'magic'", "'std'"),
    ({"prune": [{"criterion": "density", "density": {"fc1": 1.5}}]}, "prune[0].density.fc1", "1.5", "(0.0, 1.0]"),
    ({"prune": [{"criterion": "global", "sparsity": 1.0}]}, "prune[0].sparsity", "1.0", "[0.0, 1.0)"),
    ({"prune": [{"criterion": "std", "q": 1, "retrain": {"freeze": "all"}}]}, "prune[0].retrain.freeze", "'all'",
     "'conv'"),
])
def test_bad_values_are_named_with_what_is_allowed(raw, field, value, allowed):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    message = str(info.value)
    assert message.startswith(field + ":")
    assert value in message
    assert allowed in message


def test_unknown_keys_and_missing_targets_are_reported():
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['learning_rate'\]; allowed: \["):
        from_dict({"train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"prune\[0\]\.q: required by criterion 'std'"):
        from_dict({"prune": [{"criterion": "std"}]})
    with pytest.raises(ConfigError, match=r"prune\[0\]: \['q'\] do not apply to criterion 'density'"):
        from_dict({"prune": [{"criterion": "density", "density": 0.1, "q": 1.0}]})


def test_han2015_network_defaults_to_the_model_and_repeat_expands():
    config = from_dict({"model": {"name": "lenet-5"}, "prune": [{"criterion": "han2015"},
                                                                {"criterion": "std", "q": 0.5, "repeat": 3}]})
    assert config.prune[0].network == "lenet-5"
    assert [s.criterion for s in config.prune] == ["han2015", "std", "std", "std"]
    with pytest.raises(ConfigError, match=r"prune\[0\]\.network"):
        from_dict({"model": {"name": "lenet-300-100", "kwargs": {}}, "prune": [{"criterion": "han2015",
                                                                               "network": "resnet-9000"}]})


def test_overrides_set_nested_values_and_list_items():
    raw = {"train": {"lr": 0.1}, "prune": [{"criterion": "std", "q": 1.0}]}
    out = apply_overrides(raw, ["train.lr=0.02", "prune.0.q=1.5", "data.dataset=mnist", "train.threads=2"])
    assert out["train"] == {"lr": 0.02, "threads": 2}
    assert out["prune"][0]["q"] == 1.5
    assert out["data"] == {"dataset": "mnist"}
    assert raw["train"]["lr"] == 0.1  # the input is not changed
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides(raw, ["train.lr"])
    with pytest.raises(ConfigError, match=r"prune\.3 must index the list"):
        apply_overrides(raw, ["prune.3.q=1"])


def test_load_config_reports_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {epochs: 3}\n")
    assert load_config(ok, ["train.epochs=5"]).train.epochs == 5


def test_overrides_read_exponent_numbers():
    out = apply_overrides({}, ["train.lr=1e-3", "train.strength=5E-4", "name=1e3x"])
    assert out["train"] == {"lr": 0.001, "strength": 0.0005}
    assert out["name"] == "1e3x"


def test_data_validation_is_validated_and_held_out_from_the_end():
    import torch

    from magprune.experiment.config import ConfigError, from_dict
    from magprune.experiment.data import hold_out

    assert from_dict({}).data.validation == 0
    assert from_dict({"data": {"validation": 5000}}).data.validation == 5000
    for bad in (-1, 1.5, "many", True):
        with pytest.raises(ConfigError, match="data.validation"):
            from_dict({"data": {"validation": bad}})
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    (_, yt), (xv, yv) = hold_out((x, y), 3)
    assert yt.tolist() == list(range(7)) and yv.tolist() == [7, 8, 9] and xv[:, 0].tolist() == [7.0, 8.0, 9.0]
    assert len(hold_out((x, y), 0)[1][1]) == 0
    with pytest.raises(ValueError, match="data.validation: must hold out fewer than the 10"):
        hold_out((x, y), 10)


def test_sparse_compute_under_fsdp_is_refused_at_load_not_after_the_dense_training():
    steps = [{"criterion": "std", "q": 1.0, "retrain": {"epochs": 1, "compute": "sparse"}}]
    with pytest.raises(ConfigError, match=r"prune\[0\]\.retrain\.compute: 'sparse' does not run under "
                                          r"train\.distributed 'fsdp'"):
        from_dict({"train": {"distributed": "fsdp"}, "prune": steps})
    assert from_dict({"train": {"distributed": "ddp"}, "prune": steps}).prune[0].retrain.compute == "sparse"
