"""Pipeline room: the run driver — config -> stages (dense training, prune + retrain steps) -> run directory
(metrics, checkpoints, model, masks, summary, report). The stages themselves are in :mod:`.stages`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from magprune.analysis.plots import sample_weights
from magprune.environment import describe, machine_info
from magprune.experiment import distributed
from magprune.experiment.config import ConfigError, ExperimentConfig, from_dict
from magprune.experiment.data import hold_out, load_dataset
from magprune.experiment.rundir import RunError, RunWriter, check_writable, lock_run_dir, plain
from magprune.experiment.stages import Position, RunContext, Stage, build_stages
from magprune.models import create_model
from magprune.pruner import Pruner
from magprune.report import activation_density, sparsity_report
from magprune.retrain import DropoutRescaler

__all__ = ["RunError", "build_model", "load_run", "lock_run_dir", "render_report", "run_experiment"]

# Han et al. 2015, Table 1 (error before -> after, parameters before -> after, compression).
PAPER_TABLE1 = {
    "lenet-300-100": {"error_before": 0.0164, "error_after": 0.0159, "params_before": "267K",
                      "params_after": "22K", "compression": 12.0},
    "lenet-5": {"error_before": 0.0080, "error_after": 0.0077, "params_before": "431K",
                "params_after": "36K", "compression": 12.0},
}


def build_model(config: ExperimentConfig) -> nn.Module:
    kwargs = dict(config.model.kwargs)
    if config.train.dropout and "dropout" not in kwargs:
        kwargs["dropout"] = config.train.dropout
    try:
        return create_model(config.model.name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.kwargs: {config.model.name} cannot be built with {kwargs!r} ({exc})") from exc


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``model.weights`` (a safetensors state_dict of this model: a finished run's model.safetensors, or the
    dense network of a run, its checkpoints/dense.safetensors) into ``model``; a missing, unreadable or mismatching
    file is a ConfigError naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights: {path} is not a file")
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as exc:
        raise ConfigError(f"model.weights: {path} is not a safetensors file ({exc})") from exc
    if tensors and all(k.startswith("model.") for k in tensors):  # a run's checkpoints/dense.safetensors
        tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
    try:
        with torch.no_grad():
            model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"model.weights: {path} does not fit the model: {' '.join(first[:3])}") from exc


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, data_dir: str | None = None,
                   progress: bool = True, echo: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """Train, prune and retrain as ``config`` says, writing everything into ``run_dir``; returns the summary.

    The run is a list of stages (:func:`~magprune.experiment.stages.build_stages`). ``checkpoints/resume.pt`` is
    written atomically after every epoch, every prune and every finished stage, holding the :class:`Position`
    (which stage, and its own state: epoch, batch); with ``resume`` the run continues from the last complete one
    and ends with the same metrics as an uninterrupted run.
    """
    start = time.perf_counter()
    stages = build_stages(config)
    ctx = open_run(config, Path(run_dir), stages, data_dir=data_dir, progress=progress, echo=echo)
    try:
        for stage in stages:
            stage.check(ctx)  # a config error a stage can see (a freeze that cannot apply): before any training
        position = ctx.resume() if resume else Position()
        for index in range(position.stage, len(stages)):
            ctx.stage = index
            ctx.results.pop("final_errors", None)  # set by a stage that trains (its last epoch's); any other may
            # change the model, and then the errors are evaluated again at the end
            stages[index].run(ctx, position.state if index == position.stage else None)
            ctx.save(Position(index + 1))  # a finished stage is never repeated
        return finish_run(ctx, start)
    finally:
        ctx.writer.close()


def open_run(config: ExperimentConfig, run_dir: Path, stages: list[Stage], *, data_dir: str | None, progress: bool,
             echo: Callable[[str], None]) -> RunContext:
    """The edge of a run: process group, threads, data, the locked run directory, the model and its pruner."""
    distributed.init_from_env()
    if not distributed.is_main():
        echo = _silent  # every rank computes, rank 0 reports
    device = distributed.device()
    load_average_start = machine_info()["load_average"]
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    # data first: a missing file should fail before anything is written
    train, test = load_dataset(config.data.dataset, data_dir or config.data.dir,
                               download_missing=config.data.download, seed=config.seed)
    try:
        train, validation = hold_out(train, config.data.validation)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    train = (train[0].to(device), train[1].to(device))
    validation = (validation[0].to(device), validation[1].to(device))
    test = (test[0].to(device), test[1].to(device))
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    if config.model.weights:
        # "{seed}" in the path is the run's seed: one config (and one --seeds command) starts each seed from its own
        # trained model, e.g. model.weights=runs/X/seed-{seed}/checkpoints/dense.safetensors
        # a bad file, like missing data, fails before anything is written
        load_weights(model, config.model.weights.replace("{seed}", str(config.seed)))
    lock = None
    if distributed.is_main():
        lock = lock_run_dir(run_dir)  # released when the run ends or the process dies
        check_writable(run_dir)
    writer = RunWriter(run_dir, config.output.checkpoints, enabled=distributed.is_main(), lock=lock)
    writer.write("config.yaml", config.to_yaml().encode())
    echo(f"{config.name}: {config.model.name} on {config.data.dataset} ({len(train[1])} train / "
         + (f"{len(validation[1])} validation / " if config.data.validation else "") + f"{len(test[1])} test)")
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-d weights only: before the pruner and optimizers see them
    if config.train.distributed == "fsdp" and distributed.is_distributed():
        distributed.shard_model(model)  # before the pruner and the optimizers take its parameters
    pruner = Pruner(model)
    rescaler = DropoutRescaler(model, pruner) if any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()) else None
    return RunContext(config=config, run_dir=run_dir, stages=stages, model=model, pruner=pruner, train=train,
                      test=test, writer=writer, echo=echo, progress=progress, rescaler=rescaler,
                      load_average_start=load_average_start, build_model=lambda: build_model(config),
                      validation=validation)


def finish_run(ctx: RunContext, start: float) -> dict[str, Any]:
    """After the last stage: the histograms, model.safetensors, masks.safetensors, summary.json and report.md."""
    config, pruner, run_dir = ctx.config, ctx.pruner, ctx.run_dir
    # the last training stage's errors (its last epoch's), else (no stage trained: nothing to prune) evaluated now
    final_error, final_validation = ctx.results.get("final_errors") or (ctx.evaluate(), ctx.validation_error())
    whole = ctx.whole_model()  # under FSDP2 a plain copy: the files hold whole tensors, as from one process
    # Weights for the histograms (Han's Fig. 7): dense, right after the last prune, after the last retraining.
    snapshots = dict(ctx.snapshots)
    dense_file = run_dir / "checkpoints" / "dense.safetensors"
    if "dense" not in snapshots and dense_file.is_file():  # dense training finished before a resume
        dense_tensors = load_safetensors(dense_file.read_bytes())
        snapshots = {"dense": sample_weights({n: dense_tensors[f"model.{n}"] for n in pruner.params
                                              if f"model.{n}" in dense_tensors}), **snapshots}
        del dense_tensors
    if config.prune:
        snapshots["retrained"] = sample_weights({n: p for n, p in whole.named_parameters() if n in pruner.params})
    figures = []
    if distributed.is_main() and snapshots:
        from magprune.analysis.plots import plot_weight_histograms

        plot_weight_histograms(snapshots, run_dir / "histograms.png",
                               title=f"{config.model.name}: weights per layer ({', '.join(snapshots)})",
                               sizes={n: p.numel() for n, p in pruner.params.items()})
        figures.append(("Weight distribution per layer (Han et al. Fig. 7)", "histograms.png"))
    # Han's FLOP accounting: weights kept x density of each layer's input activations, measured on the test set
    report = sparsity_report(whole, ctx.test[0][:1]).with_input_density(
        activation_density(whole, ctx.test[0], batch_size=config.train.eval_batch_size))
    ctx.writer.write("model.safetensors", save_safetensors(plain(whole.state_dict())))
    masks = plain(ctx.whole_masks()) or {n: torch.ones(p.shape, dtype=torch.bool) for n, p in pruner.params.items()}
    ctx.writer.write("masks.safetensors", save_safetensors(masks))
    dense_error = ctx.results["dense_error"]
    summary = {
        "name": config.name,
        "model": config.model.name,
        "dataset": config.data.dataset,
        "error_before": dense_error,
        "error_after": final_error,
        "validation": config.data.validation,
        "validation_error_before": ctx.results.get("dense_validation_error"),
        "validation_error_after": final_validation,
        "params_before": report.params_total,
        "params_after": report.params_nonzero,
        "weights_before": report.weights,
        "weights_after": report.nonzero,
        "compression": report.params_compression,
        "weight_compression": report.compression,
        "sparsity": pruner.sparsity(),
        "steps": ctx.results["steps"],
        "report": report.as_dict(),
        "wall_seconds": time.perf_counter() - start,
        "figures": figures,
        "quantize": ctx.results.get("quantize"),
        "machine": {**machine_info(), "load_average_start": ctx.load_average_start,
                    "processes": distributed.world_size(),
                    "distributed": config.train.distributed if distributed.is_distributed() else None},
    }
    ctx.writer.write("summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    ctx.writer.write("report.md", render_report(summary).encode())
    ctx.echo("")
    ctx.echo(report.to_text())
    ctx.echo(f"\nerror {100 * dense_error:.2f}% -> {100 * final_error:.2f}%, parameters "
             f"{summary['params_before']:,} -> {summary['params_after']:,} ({summary['compression']:.1f}x), "
             f"{summary['wall_seconds']:.0f} s; run directory {run_dir}")
    return summary


def _silent(message: str) -> None:
    return None


def _k(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.1f}K" if value < 1_000_000 else f"{value / 1e6:.2f}M"


def render_report(summary: dict[str, Any]) -> str:
    """report.md: Han et al.'s Table 1 row and a per-layer table laid out like their Tables 2-3."""
    rep = summary["report"]
    lines = [f"# {summary['name']}: {summary['model']} on {summary['dataset']}", "",
             "## Table 1 row", "",
             "| network | error before | error after | parameters before | parameters after | compression |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| {summary['model']} (this run) | {100 * summary['error_before']:.2f}% | "
             f"{100 * summary['error_after']:.2f}% | {_k(summary['params_before'])} | {_k(summary['params_after'])} | "
             f"{summary['compression']:.1f}x |"]
    paper = PAPER_TABLE1.get(summary["model"])
    if paper is not None and summary["dataset"] == "mnist":
        lines.append(f"| {summary['model']} (Han et al. 2015) | {100 * paper['error_before']:.2f}% | "
                     f"{100 * paper['error_after']:.2f}% | {paper['params_before']} | {paper['params_after']} | "
                     f"{paper['compression']:.0f}x |")
    lines += ["", "Parameters count every weight and bias; compression is parameters before / nonzero after."]
    if summary.get("validation_error_after") is not None:
        lines += ["", f"Validation error (the last {summary['validation']} training images, held out): "
                  f"{100 * summary['validation_error_before']:.2f}% dense -> "
                  f"{100 * summary['validation_error_after']:.2f}% after; trained on the rest."]
    lines += ["", "## Per layer (as Han et al.'s Tables 2-3)", "",
              "| layer | weights | FLOP | % weights kept | % FLOP kept | % FLOP kept (Han) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rep["layers"]:
        lines.append(f"| {row['layer']} | {_k(row['weights'])} | {_k(row['flops'])} | {100 * row['density']:.1f}% | "
                     f"{_pct(row['remaining_flops'], row['flops'])} | {_pct(row.get('han_flops'), row['flops'])} |")
    total = rep["total"]
    lines.append(f"| total | {_k(total['weights'])} | {_k(total['flops'])} | {100 * total['density']:.1f}% | "
                 f"{_pct(total['remaining_flops'], total['flops'])} | {_pct(total.get('han_flops'), total['flops'])} |")
    lines += ["", "% FLOP kept scales each layer's FLOPs by its weights kept; (Han) also by the density of "
              "the layer's input activations on the test set (zeros from ReLU and pruned neurons), as Han et al. "
              "count; the network's input counts as dense."]
    if summary["steps"]:
        lines += ["", "## Pruning steps", "",
                  "| step | criterion | sparsity | compression | error pruned | error retrained |",
                  "| ---: | --- | ---: | ---: | ---: | ---: |"]
        for s in summary["steps"]:
            compression = "-" if s.get("compression") is None else f"{s['compression']:.1f}x"
            lines.append(f"| {s['step']} | {s['criterion']} | {100 * s['sparsity']:.2f}% | {compression} | "
                         f"{100 * s['error_pruned']:.2f}% | {100 * s['error_retrained']:.2f}% |")
    lines += _quantize_report(summary.get("quantize"))
    for caption, file in summary.get("figures", []):
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    machine = summary["machine"]
    load = machine.get("load_average")
    lines += ["", f"Wall time {summary['wall_seconds']:.0f} s on {describe(machine)}; load average at the end "
              f"{'/'.join(f'{v:.2f}' for v in load) if load else 'unknown'}.", ""]
    return "\n".join(lines)


def _quantize_report(quantized: dict[str, Any] | None) -> list[str]:
    """report.md's Deep Compression section: the per-layer table and the file-size ratio against dense fp32."""
    if not quantized:
        return []
    layers = ", ".join(f"{n} {b} bits" for n, b in quantized["bits"].items())
    lines = ["", "## Deep Compression: weight sharing and entropy coding (Han, Mao, Dally 2016, Tables 2-3)", "",
             f"Shared values per layer: {layers} ({quantized['init']} init); test error "
             f"{100 * quantized['error_shared']:.2f}% once shared, {100 * quantized['error_fine_tuned']:.2f}% "
             f"after {quantized['epochs']} fine-tuning epochs.", ""]
    if "table" in quantized:
        lines += [quantized["table"], "",
                  f"`{quantized['file']}`: {quantized['file_bytes']:,} bytes against "
                  f"{quantized['dense_fp32_bytes']:,} of dense fp32, **{quantized['file_ratio']:.1f}x** smaller. "
                  "Weight bits: per codebook index as quantized (P+Q) / as stored after entropy coding (+H, per "
                  "nonzero); index bits: per relative index / as stored (fillers included)."]
    return lines


def _pct(part: int | None, whole: int | None) -> str:
    return "-" if part is None or not whole else f"{100 * part / whole:.1f}%"


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict[str, Tensor], ExperimentConfig]:
    """The final pruned model, its bool keep-masks by parameter name and the resolved config of a run directory."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors", "masks.safetensors"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run directory: {name} is missing")
    try:
        config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except yaml.YAMLError as exc:
        raise RunError(f"{run_dir / 'config.yaml'}: not valid YAML") from exc
    model = build_model(config)
    for name in ("model.safetensors", "masks.safetensors"):
        try:
            tensors = load_safetensors((run_dir / name).read_bytes())
            if name == "model.safetensors":
                model.load_state_dict(tensors, strict=True)
            else:
                masks = tensors
        except Exception as exc:  # truncated, corrupted or another architecture's file
            raise RunError(f"{run_dir / name}: cannot be loaded into {config.model.name} "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:400]})") from exc
    return model, masks, config
