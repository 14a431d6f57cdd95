"""Pipeline room: config -> dense training -> prune/retrain steps -> run directory (metrics, checkpoints, report)."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
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
from magprune.criteria import GlobalSparsity, LayerSparsity, StdThreshold, han2015
from magprune.experiment import distributed
from magprune.experiment.config import ConfigError, ExperimentConfig, PruneStep, from_dict
from magprune.experiment.data import load_dataset, write_atomic
from magprune.experiment.train import evaluate, fit
from magprune.models import create_model
from magprune.pruner import Pruner
from magprune.report import sparsity_report
from magprune.retrain import DropoutRescaler, freeze

# Han et al. 2015, Table 1 (error before -> after, parameters before -> after, compression).
PAPER_TABLE1 = {
    "lenet-300-100": {"error_before": 0.0164, "error_after": 0.0159, "params_before": "267K",
                      "params_after": "22K", "compression": 12.0},
    "lenet-5": {"error_before": 0.0080, "error_after": 0.0077, "params_before": "431K",
                "params_after": "36K", "compression": 12.0},
}

METRIC_FIELDS = ["stage", "step", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
                 "sparsity", "seconds"]


def build_criterion(step: PruneStep):
    """The :mod:`magprune.criteria` object a validated prune step describes."""
    if step.criterion == "han2015":
        return han2015(step.network)
    if step.criterion == "density":
        return LayerSparsity.from_densities(step.density) if isinstance(step.density, dict) \
            else LayerSparsity(1.0 - step.density)
    if step.criterion == "sparsity":
        return LayerSparsity(step.sparsity)
    if step.criterion == "global":
        return GlobalSparsity(step.sparsity, step.layers)
    return StdThreshold(step.q)


def build_model(config: ExperimentConfig) -> nn.Module:
    kwargs = dict(config.model.kwargs)
    if config.train.dropout and "dropout" not in kwargs:
        kwargs["dropout"] = config.train.dropout
    try:
        return create_model(config.model.name, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.kwargs: {config.model.name} cannot be built with {kwargs!r} ({exc})") from exc


class RunWriter:
    """Appends metric rows to metrics.jsonl / metrics.csv and writes checkpoints, every file atomically."""

    def __init__(self, run_dir: Path, checkpoints: bool, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.checkpoints = checkpoints and enabled
        self.enabled = enabled  # under DDP only rank 0 writes
        self.lock: Any = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
        if self.checkpoints:
            (run_dir / "checkpoints").mkdir(exist_ok=True)

    def write(self, name: str, data: bytes) -> None:
        if self.enabled:
            write_atomic(self.run_dir / name, data)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append({key: row.get(key) for key in METRIC_FIELDS})
        jsonl = "".join(json.dumps(r) + "\n" for r in self.rows)
        write_atomic(self.run_dir / "metrics.jsonl", jsonl.encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.run_dir / "metrics.csv", buffer.getvalue().encode())

    def resume_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.checkpoints:  # output.checkpoints: false trades crash safety for disk
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path = self.run_dir / "checkpoints" / RESUME_FILE
        path.parent.mkdir(exist_ok=True)
        write_atomic(path, buffer.getvalue(), before_replace=lambda: crash_point("mid-save"))

    def checkpoint(self, stage: str, model: nn.Module, masks: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if not self.checkpoints:
            return
        base = self.run_dir / "checkpoints"
        tensors = {f"model.{k}": v for k, v in _plain(model.state_dict()).items()}
        tensors.update({f"mask.{k}": v for k, v in _plain(masks).items()})
        write_atomic(base / f"{stage}.safetensors", save_safetensors(tensors))
        write_json(base / f"{stage}.json", meta)


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": list(load) if load else None}


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, data_dir: str | None = None,
                   progress: bool = True, echo: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """Train, prune and retrain as ``config`` says, writing everything into ``run_dir``; returns the summary.

    A checkpoint (``checkpoints/resume.pt``) is written atomically after every epoch and every prune; with
    ``resume`` the run continues from the last complete one and ends with the same metrics as an uninterrupted run.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
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
    train = (train[0].to(device), train[1].to(device))
    test = (test[0].to(device), test[1].to(device))
    lock = None
    if distributed.is_main():
        lock = lock_run_dir(run_dir)  # released when the run ends or the process dies
        check_writable(run_dir)
    writer = RunWriter(run_dir, config.output.checkpoints, enabled=distributed.is_main())
    writer.lock = lock
    writer.write("config.yaml", config.to_yaml().encode())
    echo(f"{config.name}: {config.model.name} on {config.data.dataset} "
         f"({len(train[1])} train / {len(test[1])} test)")
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    for i, step in enumerate(config.prune):  # a freeze that cannot apply is a config error: say so before training
        frozen = _freeze(model, step.retrain.freeze, f"prune[{i}].retrain.freeze")
        if frozen is not None:
            frozen.remove()
    pruner = Pruner(model)
    penalized = list(pruner.params.values())
    handles: list[Any] = []

    def attach(optimizer: torch.optim.Optimizer) -> None:
        handles.append(pruner.attach(optimizer))

    def logger(step: int) -> Callable[[dict[str, Any]], None]:
        def log(row: dict[str, Any]) -> None:
            writer.log({**row, "step": step, "sparsity": pruner.sparsity()})
            echo(f"  {row['stage']} epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
                 f"test error {100 * row['test_error']:.2f}% ({row['seconds']:.1f} s)")
        return log

    # Resume: where the last complete checkpoint stood. position = (step, epoch): step 0 is dense training, step i
    # the i-th prune (applied as soon as step i is reached) and its retraining; epoch counts finished epochs.
    saved = load_resume_checkpoint(run_dir) if resume else None
    position = (0, 0)
    dense_error: float | None = None
    steps: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    if saved is not None:
        model.load_state_dict(saved["model"])
        if saved["masks"]:
            pruner.load_state_dict({"masks": {k: v.to(device) for k, v in saved["masks"].items()}})
        writer.rows = list(saved["rows"])
        position = (saved["step"], saved["epoch"])
        dense_error, steps, current = saved["dense_error"], list(saved["steps"]), dict(saved["current"])
        torch.set_rng_state(saved["rng"])
        inside = f", batch {saved['fit']['batch']}" if saved["fit"] and saved["fit"].get("batch") else ""
        echo(f"resuming {run_dir} at {'dense training' if position[0] == 0 else f'step {position[0]}'}, "
             f"after epoch {position[1]}{inside}")

    def save(step: int, epoch: int, fit_state: dict[str, Any] | None) -> None:
        writer.resume_checkpoint({
            "version": RESUME_VERSION, "step": step, "epoch": epoch, "model": _plain(model.state_dict()),
            "masks": _plain(pruner.masks), "rows": writer.rows, "dense_error": dense_error, "steps": steps,
            "current": current, "rng": torch.get_rng_state(), "fit": fit_state})
        crash_point(f"saved:{step}:{epoch}")

    def epoch_saver(step: int) -> Callable[[dict[str, Any]], None]:
        def saver(state: dict[str, Any]) -> None:
            save(step, state["epoch"], state)
            if state.get("batch"):
                crash_point(f"saved:{step}:{state['epoch']}:{state['batch']}")
        return saver

    def batch_hook(step: int) -> Callable[[int, int], None] | None:
        if not os.environ.get(CRASH_ENV):
            return None
        return lambda epoch, batch: crash_point(f"batch:{step}:{epoch}:{batch}")

    fit_resume = saved["fit"] if saved is not None and saved["fit"] is not None else None
    if position[0] == 0:
        fit(model, train, test, config.train, lr=config.train.lr, epochs=config.train.epochs, seed=config.seed,
            stage="dense", penalized=penalized, on_epoch=logger(0), on_epoch_state=epoch_saver(0),
            resume=fit_resume, on_batch=batch_hook(0), checkpoint_every=config.output.checkpoint_every,
            progress=progress)
        _, dense_error = evaluate(model, *test, batch_size=config.train.eval_batch_size)
        echo(f"dense: test error {100 * dense_error:.2f}%")
        writer.checkpoint("dense", model, {}, {"stage": "dense", "test_error": dense_error})
        position, fit_resume = (1, -1), None
    dense_report = sparsity_report(model, test[0][:1])
    # Weights for the histograms (Han's Fig. 7): dense, right after the last prune, after the last retraining.
    snapshots: dict[str, dict[str, Tensor]] = {}
    if position[0] <= 1 and position[1] < 0:
        snapshots["dense"] = sample_weights(pruner.params)
    elif (run_dir / "checkpoints" / "dense.safetensors").is_file():
        dense_tensors = load_safetensors((run_dir / "checkpoints" / "dense.safetensors").read_bytes())
        snapshots["dense"] = sample_weights({n: dense_tensors[f"model.{n}"] for n in pruner.params
                                             if f"model.{n}" in dense_tensors})
        del dense_tensors

    rescaler = DropoutRescaler(model, pruner) if any(
        isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()) else None
    for i, step in enumerate(config.prune, start=1):
        if i < position[0]:
            continue
        if i > position[0] or position[1] < 0:  # step i not started: prune now
            fit_resume = None
            densities = pruner.prune(build_criterion(step))
            snapshots["pruned"] = sample_weights(pruner.params)
            _, pruned_error = evaluate(model, *test, batch_size=config.train.eval_batch_size)
            current = {"densities": densities, "pruned_error": pruned_error}
            writer.log({"stage": f"prune-{i}", "step": i, "test_error": pruned_error, "sparsity": pruner.sparsity()})
            echo(f"prune {i} ({step.criterion}): sparsity {100 * pruner.sparsity():.2f}%, "
                 f"test error before retraining {100 * pruned_error:.2f}%")
            crash_point(f"pruned:{i}")
            save(i, 0, None)
        if rescaler is not None and step.retrain.dropout_rescale:
            rescaler.apply()
        frozen = _freeze(model, step.retrain.freeze, f"prune[{i - 1}].retrain.freeze")
        try:
            fit(model, train, test, config.train, lr=config.train.lr * step.retrain.lr_fraction,
                epochs=step.retrain.epochs, seed=config.seed + i, stage=f"retrain-{i}", penalized=penalized,
                on_optimizer=attach, on_epoch=logger(i), on_epoch_state=epoch_saver(i), resume=fit_resume,
                on_batch=batch_hook(i), checkpoint_every=config.output.checkpoint_every, progress=progress)
        finally:
            if frozen is not None:
                frozen.remove()
            for handle in handles:
                handle.remove()
            handles.clear()
        fit_resume = None
        pruner.check()
        _, retrained_error = evaluate(model, *test, batch_size=config.train.eval_batch_size)
        steps.append({"step": i, "criterion": step.criterion, "densities": current["densities"],
                      "sparsity": pruner.sparsity(), "error_pruned": current["pruned_error"],
                      "error_retrained": retrained_error})
        writer.checkpoint(f"step-{i}", model, pruner.masks,
                          {"stage": f"step-{i}", **steps[-1]})
        echo(f"retrain {i}: test error {100 * retrained_error:.2f}%")
        save(i + 1, -1, None)

    _, final_error = evaluate(model, *test, batch_size=config.train.eval_batch_size)
    if config.prune:
        snapshots["retrained"] = sample_weights(pruner.params)
    figures = []
    if distributed.is_main() and snapshots:
        from magprune.analysis.plots import plot_weight_histograms

        plot_weight_histograms(snapshots, run_dir / "histograms.png",
                               title=f"{config.model.name}: weights per layer ({', '.join(snapshots)})",
                               sizes={n: p.numel() for n, p in pruner.params.items()})
        figures.append(("Weight distribution per layer (Han et al. Fig. 7)", "histograms.png"))
    final_report = sparsity_report(model, test[0][:1])
    writer.write("model.safetensors", save_safetensors(_plain(model.state_dict())))
    masks = _plain(pruner.masks) or {n: torch.ones_like(p, dtype=torch.bool).cpu() for n, p in pruner.params.items()}
    writer.write("masks.safetensors", save_safetensors(masks))
    summary = {
        "name": config.name,
        "model": config.model.name,
        "dataset": config.data.dataset,
        "error_before": dense_error,
        "error_after": final_error,
        "params_before": dense_report.params_total,
        "params_after": final_report.params_nonzero,
        "weights_before": final_report.weights,
        "weights_after": final_report.nonzero,
        "compression": final_report.params_compression,
        "weight_compression": final_report.compression,
        "sparsity": pruner.sparsity(),
        "steps": steps,
        "report": final_report.as_dict(),
        "wall_seconds": time.perf_counter() - start,
        "figures": figures,
        "machine": {**machine_info(), "load_average_start": load_average_start,
                    "processes": distributed.world_size()},
    }
    writer.write("summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    writer.write("report.md", render_report(summary).encode())
    if writer.lock is not None:
        writer.lock.close()
    echo("")
    echo(final_report.to_text())
    echo(f"\nerror {100 * dense_error:.2f}% -> {100 * final_error:.2f}%, parameters "
         f"{summary['params_before']:,} -> {summary['params_after']:,} ({summary['compression']:.1f}x), "
         f"{summary['wall_seconds']:.0f} s; run directory {run_dir}")
    return summary


RESUME_FILE = "resume.pt"
RESUME_VERSION = 1
CRASH_ENV = "MAGPRUNE_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$MAGPRUNE_CRASH_AT`` names this point (the crash-safety tests)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and wanted == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class RunError(ValueError):
    """The run directory cannot be used (not writable, locked by another run, nothing to resume)."""


def lock_run_dir(run_dir: Path) -> Any:
    """Take RUN_DIR/.lock (an flock, released by the kernel when the process dies, even by SIGKILL); a second run
    on the same directory is refused instead of corrupting the first."""
    import fcntl

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - must stay open for the whole run
    except OSError as exc:
        raise RunError(f"run directory {run_dir} is not usable: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise RunError(f"run directory {run_dir} is in use by another magprune run (lock {run_dir / '.lock'}); "
                       "wait for it or choose another --out") from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_writable(run_dir: Path, probe_bytes: int = 1 << 20) -> None:
    """Write (and remove) a 1 MiB probe file, so an unwritable or full directory fails before any training."""
    probe = run_dir / ".write-probe"
    try:
        write_atomic(probe, b"\0" * probe_bytes)
        probe.unlink()
    except OSError as exc:
        raise RunError(f"run directory {run_dir} is not writable: {exc.strerror or exc}") from exc


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last complete checkpoint of ``run_dir`` (None if the run never finished an epoch), loaded safely."""
    path = run_dir / "checkpoints" / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why, never unpickle code
        raise RunError(f"{path}: not a readable magprune checkpoint ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("version") != RESUME_VERSION:
        raise RunError(f"{path}: not a magprune resume checkpoint of version {RESUME_VERSION}")
    return state


def _silent(message: str) -> None:
    return None


def _freeze(model: nn.Module, kind: str, where: str) -> Any:
    if kind == "none":
        return None
    try:
        frozen = freeze(model, kind)
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot freeze {kind!r} layers: {exc}") from exc
    if not any(p.requires_grad for p in model.parameters()):
        frozen.remove()
        raise ConfigError(f"{where}: freezing the {kind!r} layers of {type(model).__name__} leaves nothing to train")
    return frozen


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
    lines += ["", "Parameters count every weight and bias; compression is parameters before / nonzero after.", "",
              "## Per layer (as Han et al.'s Tables 2-3)", "",
              "| layer | weights | FLOP | % weights kept | % FLOP kept |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rep["layers"]:
        lines.append(f"| {row['layer']} | {_k(row['weights'])} | {_k(row['flops'])} | {100 * row['density']:.1f}% | "
                     f"{_pct(row['remaining_flops'], row['flops'])} |")
    total = rep["total"]
    lines.append(f"| total | {_k(total['weights'])} | {_k(total['flops'])} | {100 * total['density']:.1f}% | "
                 f"{_pct(total['remaining_flops'], total['flops'])} |")
    if summary["steps"]:
        lines += ["", "## Pruning steps", "", "| step | criterion | sparsity | error pruned | error retrained |",
                  "| ---: | --- | ---: | ---: | ---: |"]
        for s in summary["steps"]:
            lines.append(f"| {s['step']} | {s['criterion']} | {100 * s['sparsity']:.2f}% | "
                         f"{100 * s['error_pruned']:.2f}% | {100 * s['error_retrained']:.2f}% |")
    for caption, file in summary.get("figures", []):
        lines += ["", f"## {caption}", "", f"![{caption}]({file})"]
    machine = summary["machine"]
    load = machine.get("load_average")
    lines += ["", f"Wall time {summary['wall_seconds']:.0f} s on {machine['cpu_count']} CPU cores "
              f"(torch {machine['torch']}, {machine['torch_threads']} threads); load average at the end "
              f"{'/'.join(f'{v:.2f}' for v in load) if load else 'unknown'}.", ""]
    return "\n".join(lines)


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
