"""Config room: the YAML experiment config as dataclasses, validated on load, with dotted ``key=value`` overrides."""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from magprune.deploy.quantize import INITS, MAX_BITS
from magprune.experiment.data import DATASET_NAMES


class ConfigError(ValueError):
    """The experiment config is invalid; the message names the field, the bad value and what is allowed."""


OPTIMIZERS = ("sgd", "adam")
LR_POLICIES = ("constant", "inv", "step", "cosine")
REGULARIZERS = ("none", "l1", "l2")
CRITERIA = ("han2015", "density", "sparsity", "std", "global")
FREEZE = ("none", "conv", "fc")
COMPUTE = ("dense", "sparse")  # retraining: dense products under the masks, or magprune.sparse_compute
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class ModelConfig:
    name: str = "lenet-300-100"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # a safetensors state_dict to start from (e.g. a trained dense model's); "{seed}" in
    # it is replaced by the run's seed


@dataclass
class DataConfig:
    dataset: str = "digits"
    dir: str | None = None
    download: bool = False
    validation: int = 0  # the last N training images held out to choose a recipe on (never the test set)


@dataclass
class LRSchedule:
    policy: str = "constant"
    gamma: float = 1e-4  # inv: lr * (1 + gamma * iter) ** -power; step: factor every step_epochs
    power: float = 0.75
    step_epochs: int = 10


@dataclass
class TrainConfig:
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = 10
    batch_size: int = 64
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    regularization: str = "l2"
    strength: float = 5e-4
    dropout: float = 0.0
    eval_batch_size: int = 2000
    threads: int = 1  # torch intra-op threads; 0 = torch's default. Small nets run fastest on one, busy machines too.
    distributed: str = "ddp"  # under torchrun: "ddp" (a whole copy per rank) or "fsdp" (FSDP2 fully_shard, 1/N each)
    channels_last: bool = False  # conv weights and image batches in NHWC: oneDNN's faster convolutions on CPU


@dataclass
class RetrainConfig:
    epochs: int = 10
    lr_fraction: float = 0.1
    freeze: str = "none"
    dropout_rescale: bool = True
    compute: str = "dense"  # "sparse": pruned Linear layers computed over their kept connections only


@dataclass
class PruneStep:
    criterion: str = "han2015"
    network: str | None = None  # han2015: which published table (default: the model's name)
    density: float | dict[str, float] | None = None
    sparsity: float | dict[str, float] | None = None
    q: float | dict[str, float] | None = None
    layers: list[str] | None = None  # global: restrict to these layers
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


@dataclass
class QuantizeConfig:
    """Deep Compression's weight sharing after the last prune step: ``2**bits`` shared values per layer (``bits``:
    one int, or a mapping of parameter/module names or ``conv``/``fc`` to bits), centroids initialised ``init``,
    then ``epochs`` of fine-tuning the shared values at ``lr_fraction`` x ``train.lr``."""

    bits: int | dict[str, int] = 5
    init: str = "linear"
    epochs: int = 0
    lr_fraction: float = 0.01


@dataclass
class OutputConfig:
    dir: str | None = None
    checkpoints: bool = True
    checkpoint_every: int = 0  # also checkpoint every this many optimizer steps inside an epoch (0: per epoch)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: list[PruneStep] = field(default_factory=list)
    output: OutputConfig = field(default_factory=OutputConfig)
    quantize: QuantizeConfig | None = None  # None: no weight sharing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- validation helpers

def _keys(raw: Any, where: str, allowed: list[str]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with keys {allowed}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {allowed}")
    return raw


def _number(value: Any, where: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
            hi_open: bool = False, integer: bool = False) -> Any:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    low = "(" if lo_open else "["
    high = ")" if hi_open or hi == math.inf else "]"
    allowed = f"{kind} in {low}{lo}, {hi}{high}"
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)):
        raise ConfigError(f"{where}: must be {allowed}, got {value!r}")
    v = float(value)
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        raise ConfigError(f"{where}: must be {allowed}, got {value!r}")
    return int(value) if integer else float(value)


def _choice(value: Any, where: str, allowed: tuple[str, ...] | list[str]) -> str:
    if value is None and "none" in allowed:
        return "none"
    if value not in allowed:
        raise ConfigError(f"{where}: must be one of {list(allowed)}, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, got {value!r}")
    return value


def _fractions(value: Any, where: str, *, lo_open: bool, hi_open: bool) -> float | dict[str, float]:
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where}: must name at least one layer, got an empty mapping")
        return {str(k): _number(v, f"{where}.{k}", 0.0, 1.0, lo_open=lo_open, hi_open=hi_open)
                for k, v in value.items()}
    return _number(value, where, 0.0, 1.0, lo_open=lo_open, hi_open=hi_open)


# ---------------------------------------------------------------- sections

def _model(raw: Any) -> ModelConfig:
    from magprune.models import list_models

    raw = _keys(raw, "model", ["name", "kwargs", "weights"])
    name = _choice(raw.get("name", "lenet-300-100"), "model.name", list_models())
    kwargs = raw.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.kwargs: must be a mapping of constructor arguments, got {kwargs!r}")
    weights = raw.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ConfigError(f"model.weights: must be the path of a safetensors file, got {weights!r}")
    return ModelConfig(name=name, kwargs=dict(kwargs), weights=weights)


def _data(raw: Any) -> DataConfig:
    raw = _keys(raw, "data", ["dataset", "dir", "download", "validation"])
    dataset = _choice(raw.get("dataset", "digits"), "data.dataset", DATASET_NAMES)
    directory = raw.get("dir")
    if directory is not None and not isinstance(directory, str):
        raise ConfigError(f"data.dir: must be a directory path (string) or null, got {directory!r}")
    return DataConfig(dataset=dataset, dir=directory, download=_bool(raw.get("download", False), "data.download"),
                      validation=_number(raw.get("validation", 0), "data.validation", 0, integer=True))


def _schedule(raw: Any, where: str) -> LRSchedule:
    raw = _keys(raw, where, ["policy", "gamma", "power", "step_epochs"])
    d = LRSchedule()
    policy = _choice(raw.get("policy", d.policy), f"{where}.policy", LR_POLICIES)
    gamma = _number(raw.get("gamma", d.gamma), f"{where}.gamma", 0.0)
    if policy == "step" and gamma > 1:
        raise ConfigError(f"{where}.gamma: the step policy multiplies lr by gamma, must be in [0, 1], got {gamma!r}")
    return LRSchedule(policy=policy, gamma=gamma,
                      power=_number(raw.get("power", d.power), f"{where}.power", 0.0),
                      step_epochs=_number(raw.get("step_epochs", d.step_epochs), f"{where}.step_epochs", 1,
                                          integer=True))


def _train(raw: Any) -> TrainConfig:
    allowed = ["optimizer", "lr", "momentum", "epochs", "batch_size", "lr_schedule", "regularization", "strength",
               "dropout", "eval_batch_size", "threads", "distributed", "channels_last"]
    raw = _keys(raw, "train", allowed)
    d = TrainConfig()
    return TrainConfig(
        optimizer=_choice(raw.get("optimizer", d.optimizer), "train.optimizer", OPTIMIZERS),
        lr=_number(raw.get("lr", d.lr), "train.lr", 0.0, lo_open=True),
        momentum=_number(raw.get("momentum", d.momentum), "train.momentum", 0.0, 1.0, hi_open=True),
        epochs=_number(raw.get("epochs", d.epochs), "train.epochs", 0, integer=True),
        batch_size=_number(raw.get("batch_size", d.batch_size), "train.batch_size", 1, integer=True),
        lr_schedule=_schedule(raw.get("lr_schedule"), "train.lr_schedule"),
        regularization=_choice(raw.get("regularization", d.regularization), "train.regularization", REGULARIZERS),
        strength=_number(raw.get("strength", d.strength), "train.strength", 0.0),
        dropout=_number(raw.get("dropout", d.dropout), "train.dropout", 0.0, 1.0, hi_open=True),
        eval_batch_size=_number(raw.get("eval_batch_size", d.eval_batch_size), "train.eval_batch_size", 1,
                                integer=True),
        threads=_number(raw.get("threads", d.threads), "train.threads", 0, 1024, integer=True),
        distributed=_choice(raw.get("distributed", d.distributed), "train.distributed", DISTRIBUTED),
        channels_last=_bool(raw.get("channels_last", d.channels_last), "train.channels_last"),
    )


def _retrain(raw: Any, where: str) -> RetrainConfig:
    raw = _keys(raw, where, ["epochs", "lr_fraction", "freeze", "dropout_rescale", "compute"])
    d = RetrainConfig()
    retrain = RetrainConfig(
        epochs=_number(raw.get("epochs", d.epochs), f"{where}.epochs", 0, integer=True),
        lr_fraction=_number(raw.get("lr_fraction", d.lr_fraction), f"{where}.lr_fraction", 0.0, lo_open=True),
        freeze=_choice(raw.get("freeze", d.freeze), f"{where}.freeze", FREEZE),
        dropout_rescale=_bool(raw.get("dropout_rescale", d.dropout_rescale), f"{where}.dropout_rescale"),
        compute=_choice(raw.get("compute", d.compute), f"{where}.compute", COMPUTE),
    )
    if retrain.compute == "sparse" and retrain.freeze == "fc":
        raise ConfigError(f"{where}: compute 'sparse' retrains the fc layers sparse, freeze 'fc' leaves nothing to "
                          "compute sparse; use compute 'dense' with freeze 'fc'")
    return retrain


# which target keys each criterion needs (first) and accepts
_CRITERION_KEYS = {
    "han2015": ([], ["network"]),
    "density": (["density"], []),
    "sparsity": (["sparsity"], []),
    "std": (["q"], []),
    "global": (["sparsity"], ["layers"]),
}


def _step(raw: Any, i: int, model_name: str) -> PruneStep:
    where = f"prune[{i}]"
    raw = _keys(raw, where, ["criterion", "network", "density", "sparsity", "q", "layers", "retrain", "repeat"])
    criterion = _choice(raw.get("criterion"), f"{where}.criterion", CRITERIA)
    required, optional = _CRITERION_KEYS[criterion]
    for key in required:
        if raw.get(key) is None:
            raise ConfigError(f"{where}.{key}: required by criterion {criterion!r}, got nothing")
    extra = sorted(k for k in ("network", "density", "sparsity", "q", "layers")
                   if raw.get(k) is not None and k not in required + optional)
    if extra:
        raise ConfigError(f"{where}: {extra} do not apply to criterion {criterion!r}; it takes {required + optional}")
    step = PruneStep(criterion=criterion, retrain=_retrain(raw.get("retrain"), f"{where}.retrain"))
    if criterion == "han2015":
        from magprune.criteria import HAN2015_DENSITIES

        step.network = _choice(raw.get("network", model_name), f"{where}.network", sorted(HAN2015_DENSITIES))
    elif criterion == "density":
        step.density = _fractions(raw["density"], f"{where}.density", lo_open=True, hi_open=False)
    elif criterion == "sparsity":
        step.sparsity = _fractions(raw["sparsity"], f"{where}.sparsity", lo_open=False, hi_open=True)
    elif criterion == "global":
        step.sparsity = _number(raw["sparsity"], f"{where}.sparsity", 0.0, 1.0, hi_open=True)
        layers = raw.get("layers")
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(x, str) for x in layers)):
            raise ConfigError(f"{where}.layers: must be a non-empty list of layer names, got {layers!r}")
        step.layers = layers
    else:
        q = raw["q"]
        if isinstance(q, dict):
            if not q:
                raise ConfigError(f"{where}.q: must name at least one layer, got an empty mapping")
            step.q = {str(k): _number(v, f"{where}.q.{k}", 0.0) for k, v in q.items()}
        else:
            step.q = _number(q, f"{where}.q", 0.0)
    return step


def _steps(raw: Any, model_name: str) -> list[PruneStep]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"prune: must be a list of pruning steps, got {raw!r}")
    steps: list[PruneStep] = []
    for i, item in enumerate(raw):
        repeat = item.get("repeat", 1) if isinstance(item, dict) else 1
        repeat = _number(repeat, f"prune[{i}].repeat", 1, 1000, integer=True)
        step = _step(item, i, model_name)
        # ``repeat: n`` is shorthand for n identical steps: Han's iterative pruning with one rule.
        steps += [copy.deepcopy(step) for _ in range(repeat)]
    return steps


def _output(raw: Any) -> OutputConfig:
    raw = _keys(raw, "output", ["dir", "checkpoints", "checkpoint_every"])
    directory = raw.get("dir")
    if directory is not None and not isinstance(directory, str):
        raise ConfigError(f"output.dir: must be a directory path (string) or null, got {directory!r}")
    return OutputConfig(dir=directory, checkpoints=_bool(raw.get("checkpoints", True), "output.checkpoints"),
                        checkpoint_every=_number(raw.get("checkpoint_every", 0), "output.checkpoint_every", 0,
                                                 integer=True))


def from_dict(raw: Any) -> ExperimentConfig:
    """Validate a plain mapping (as read from YAML) into an :class:`ExperimentConfig`."""
    raw = _keys(raw, "config", ["name", "seed", "model", "data", "train", "prune", "output", "quantize"])
    name = raw.get("name", "experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: must be a non-empty string, got {name!r}")
    model = _model(raw.get("model"))
    train, steps = _train(raw.get("train")), _steps(raw.get("prune"), model.name)
    sparse = [i for i, step in enumerate(steps) if step.retrain.compute == "sparse"]
    if train.distributed == "fsdp" and sparse:
        # refused here, not after the dense training: sparse compute keeps whole compact weights on every rank
        raise ConfigError(f"prune[{sparse[0]}].retrain.compute: 'sparse' does not run under train.distributed "
                          "'fsdp' (sharded weights); use train.distributed 'ddp' (the compact gradients are "
                          "all-reduced) or compute 'dense'")
    return ExperimentConfig(
        name=name,
        seed=_number(raw.get("seed", 0), "seed", 0, 2**63 - 1, integer=True),
        model=model,
        data=_data(raw.get("data")),
        train=train,
        prune=steps,
        output=_output(raw.get("output")),
        quantize=_quantize(raw.get("quantize")) if raw.get("quantize") is not None else None,
    )


def _quantize(raw: Any) -> QuantizeConfig:
    raw = _keys(raw, "quantize", ["bits", "init", "epochs", "lr_fraction"])
    d = QuantizeConfig()
    bits = raw.get("bits", d.bits)
    if isinstance(bits, dict):
        if not bits or not all(isinstance(k, str) for k in bits):
            raise ConfigError(f"quantize.bits: a mapping must name layers (or conv/fc) by strings, got {bits!r}")
        bits = {k: _number(v, f"quantize.bits.{k}", 1, MAX_BITS, integer=True) for k, v in bits.items()}
    else:
        bits = _number(bits, "quantize.bits", 1, MAX_BITS, integer=True)
    return QuantizeConfig(
        bits=bits,
        init=_choice(raw.get("init", d.init), "quantize.init", INITS),
        epochs=_number(raw.get("epochs", d.epochs), "quantize.epochs", 0, integer=True),
        lr_fraction=_number(raw.get("lr_fraction", d.lr_fraction), "quantize.lr_fraction", 0.0, lo_open=True),
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML; list items by index, ``prune.0.q=1.2``)."""
    raw = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: must look like key.sub=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty part in key {key!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.problem})") from exc
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; on a command line it means a number
            with contextlib.suppress(ValueError):
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "+inf") else value
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {here} must index the list (0..{len(node) - 1})")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is {node!r}, not a mapping or list")
            if last:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                node = node[index]
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise ConfigError(f"{path}: cannot read config ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, overrides or []))
