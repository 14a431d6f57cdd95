"""Analysis room: the sensitivity scan and the trade-off curves of a run or a config, written as CSV, JSON, PNG and
a config snippet (what ``magprune sensitivity`` and ``magprune tradeoff`` do)."""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors
from torch import nn

from magprune.analysis.plots import plot_sensitivity, plot_tradeoff
from magprune.analysis.sensitivity import DEFAULT_GRID, sensitivity_scan
from magprune.analysis.tradeoff import tradeoff_curves
from magprune.experiment.config import ExperimentConfig, from_dict, load_config
from magprune.experiment.data import load_dataset
from magprune.experiment.pipeline import RunError, build_model
from magprune.experiment.train import Trainer, evaluate
from magprune.fileio import write_atomic
from magprune.pruner import Pruner


def dense_model_of_run(run_dir: Path) -> tuple[nn.Module, ExperimentConfig]:
    """The dense (trained, unpruned) model of a run directory: checkpoints/dense.safetensors."""
    config_path, dense = run_dir / "config.yaml", run_dir / "checkpoints" / "dense.safetensors"
    for path in (config_path, dense):
        if not path.is_file():
            raise RunError(f"{run_dir} has no {path.relative_to(run_dir)}: give a run directory written by "
                           "`magprune run` with checkpoints on, or a config to train from")
    config = load_config(config_path)
    model = build_model(config)
    try:
        tensors = load_safetensors(dense.read_bytes())
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    except Exception as exc:
        raise RunError(f"{dense}: cannot be loaded into {config.model.name} ({' '.join(str(exc).split())[:300]})") \
            from exc
    return model, config


def accuracy_fn(config: ExperimentConfig, test: tuple[torch.Tensor, torch.Tensor]) -> Callable[[nn.Module], float]:
    def accuracy(model: nn.Module) -> float:
        return 1.0 - evaluate(model, *test, batch_size=config.train.eval_batch_size)[1]
    return accuracy


def run_sensitivity(model: nn.Module, config: ExperimentConfig, out: Path, *, data_dir: str | None = None,
                    grid: Sequence[float] = DEFAULT_GRID, max_drop: float = 0.005, workers: int = 0,
                    progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Scan, write sensitivity.{csv,json,png} and recommended.yaml into ``out``; returns the JSON content."""
    _, test = load_dataset(config.data.dataset, data_dir or config.data.dir, seed=config.seed)
    accuracy = accuracy_fn(config, test)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    result = sensitivity_scan(model, accuracy, grid, workers=workers, progress=progress)
    targets = result.recommend(max_drop, model, accuracy)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["layer", "kind", "sparsity", "metric", "drop"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.as_rows())
    write_atomic(out / "sensitivity.csv", buffer.getvalue().encode())
    summary = {**result.as_dict(), "metric": "test accuracy", "max_drop": max_drop, "recommended_sparsity": targets,
               "model": config.model.name, "dataset": config.data.dataset}
    write_atomic(out / "sensitivity.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot_sensitivity(result, out / "sensitivity.png",
                     title=f"{config.model.name} on {config.data.dataset}: each layer pruned alone, no retraining")
    retrain = config.prune[0].retrain if config.prune else None
    step: dict[str, Any] = {"criterion": "sparsity", "sparsity": targets}
    if retrain is not None:
        step["retrain"] = {"epochs": retrain.epochs, "lr_fraction": retrain.lr_fraction}
    snippet = ("# per-layer targets from `magprune sensitivity`: joint accuracy drop without retraining "
               f"<= {100 * max_drop:.2f} points\n" + yaml.safe_dump({"prune": [step]}, sort_keys=False))
    from_dict({**config.to_dict(), "prune": [step]})  # the snippet must pass the run command's validator
    write_atomic(out / "recommended.yaml", snippet.encode())
    echo(f"baseline accuracy {100 * result.baseline:.2f}%")
    for layer, curve in result.curves.items():
        echo(f"  {layer:10s} " + " ".join(f"{100 * s:.0f}%:{100 * m:.1f}" for s, m in zip(result.sparsities, curve,
                                                                                        strict=True)))
    echo(f"recommended (joint drop <= {100 * max_drop:.2f} points): "
         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in targets.items()))
    echo(f"wrote {out}/sensitivity.csv, .json, .png and recommended.yaml")
    return summary


def train_dense(config: ExperimentConfig, data_dir: str | None = None, progress: bool = True) -> nn.Module:
    """The dense model a config trains (no pruning), for scanning a config instead of a run."""
    train, test = load_dataset(config.data.dataset, data_dir or config.data.dir, seed=config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    model = build_model(config)
    Trainer(model, train, test, config.train, seed=config.seed, stage="dense",
            penalized=list(Pruner(model).params.values()), progress=progress).fit()
    return model


def run_tradeoff(config: ExperimentConfig, out: Path, *, data_dir: str | None = None,
                 grid: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95), progress: bool = True,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Han et al.'s Fig. 5 for ``config``: dense with L1 and with L2, pruned along ``grid`` with and without
    retraining (the first prune step's retrain settings), and iterative L2. Writes tradeoff.{csv,json,png}."""
    train, test = load_dataset(config.data.dataset, data_dir or config.data.dir, seed=config.seed)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    accuracy = accuracy_fn(config, test)
    retrain_cfg = config.prune[0].retrain if config.prune else None
    retrain_epochs = retrain_cfg.epochs if retrain_cfg else max(1, config.train.epochs // 2)
    lr_fraction = retrain_cfg.lr_fraction if retrain_cfg else 0.1

    def with_reg(reg: str):
        cfg = copy.deepcopy(config.train)
        cfg.regularization = reg
        return cfg

    def make_dense(reg: str) -> nn.Module:
        torch.manual_seed(config.seed)
        model = build_model(config)
        Trainer(model, train, test, with_reg(reg), seed=config.seed, stage=f"dense-{reg}",
                penalized=list(Pruner(model).params.values()), progress=progress).fit()
        return model

    def retrain(model: nn.Module, pruner: Pruner, reg: str) -> None:
        trainer = Trainer(model, train, test, with_reg(reg), lr=config.train.lr * lr_fraction, epochs=retrain_epochs,
                          seed=config.seed + 1, stage=f"retrain-{reg}", penalized=list(pruner.params.values()),
                          progress=progress)
        handle = pruner.attach(trainer.optimizer)
        try:
            trainer.fit()
        finally:
            handle.remove()

    curves, dense = tradeoff_curves(make_dense, retrain, accuracy, grid, progress=echo)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["recipe", "sparsity", "accuracy_loss"])
    for label, points in curves.items():
        writer.writerows([label, s, loss] for s, loss in points)
    write_atomic(out / "tradeoff.csv", buffer.getvalue().encode())
    summary = {"model": config.model.name, "dataset": config.data.dataset, "dense_accuracy": dense,
               "retrain_epochs": retrain_epochs, "curves": curves}
    write_atomic(out / "tradeoff.json", (json.dumps(summary, indent=2) + "\n").encode())
    plot_tradeoff(curves, out / "tradeoff.png",
                  title=f"{config.model.name} on {config.data.dataset}: accuracy loss vs parameters pruned")
    for label, points in curves.items():
        echo(f"  {label:36s} " + " ".join(f"{100 * s:.0f}%:{100 * loss:+.2f}" for s, loss in points))
    echo(f"wrote {out}/tradeoff.csv, .json, .png")
    return summary
