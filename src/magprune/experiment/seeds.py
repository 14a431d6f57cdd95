"""Seeds room: one config over several seeds (a run directory per seed, OUT/seed-N) and their spread (seeds.json/md)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from magprune.environment import describe, machine_info
from magprune.experiment.config import ExperimentConfig, from_dict
from magprune.experiment.pipeline import RunError, run_experiment
from magprune.fileio import write_atomic

# Summary fields aggregated over seeds (those a run does not report, e.g. without a validation split, are skipped).
SEED_METRICS = ("error_before", "error_after", "validation_error_before", "validation_error_after", "compression",
                "flops_kept", "han_flops_kept", "wall_seconds")
_PERCENT = {"error_before", "error_after", "validation_error_before", "validation_error_after", "flops_kept",
            "han_flops_kept"}
_TITLES = {"error_before": "test error dense", "error_after": "test error pruned",
           "validation_error_before": "val. error dense", "validation_error_after": "val. error pruned",
           "compression": "compression", "flops_kept": "% FLOP kept (weights)",
           "han_flops_kept": "% FLOP kept (Han)", "wall_seconds": "wall s"}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (or a mix, ``"0-2,7"``) as a list of distinct non-negative seeds, in order."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            values = range(int(lo), int(hi) + 1) if sep else [int(part)]
            if sep and int(hi) < int(lo):
                raise ValueError(part)
            seeds += [v for v in values if v not in seeds]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds must be comma-separated integers >= 0 or ranges like 0-4, got {text!r}")
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, sample standard deviation (0 for one value), median, min and max of ``values``."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def _step_compression(step: dict[str, Any], summary: dict[str, Any]) -> float | None:
    """A prune step's compression: recorded by the run, or (runs from before it was) from its sparsity."""
    if step.get("compression") is not None:
        return step["compression"]
    params, weights = summary.get("params_before"), summary.get("weights_before")
    if not params or weights is None or step.get("sparsity") is None:
        return None
    return params / (params - step["sparsity"] * weights)


def seed_row(seed: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The per-seed numbers of one run's summary.json (None where the run did not measure one), with each prune
    step's compression and errors after its retraining (``steps``: the points of the iterative frontier)."""
    total = summary.get("report", {}).get("total", {})
    flops, left, han = total.get("flops"), total.get("remaining_flops"), total.get("han_flops")
    steps = [{"step": st.get("step"), "compression": _step_compression(st, summary),
              "error": st.get("error_retrained"), "validation_error": st.get("validation_error")}
             for st in summary.get("steps", [])]
    return {"seed": seed, "error_before": summary.get("error_before"), "error_after": summary.get("error_after"),
            "validation_error_before": summary.get("validation_error_before"),
            "validation_error_after": summary.get("validation_error_after"),
            "compression": summary.get("compression"),
            "flops_kept": left / flops if flops and left is not None else None,
            "han_flops_kept": han / flops if flops and han is not None else None,
            "wall_seconds": summary.get("wall_seconds"), "steps": steps}


# Published points drawn beside a frontier (compression, test error): Han et al. 2015's Table 1 and the strongest
# pruning-only rows on these nets, Dynamic Network Surgery (Guo et al. 2016; LeNet-5 108x in its paper, cited as
# 111x elsewhere).
FRONTIER_REFERENCES = {
    "lenet-300-100": (("Han et al. 2015", 12.0, 0.0159), ("Dynamic Network Surgery", 56.0, 0.0199)),
    "lenet-5": (("Han et al. 2015", 12.0, 0.0077), ("Dynamic Network Surgery", 108.0, 0.0091)),
}


def frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prune step over the seeds that reached it: the median compression and the median, min and max test
    error after its retraining (and the median validation error where every seed has one). Empty unless the runs
    pruned in two steps or more (one step is a point, not a curve)."""
    depth = max((len(r.get("steps", [])) for r in rows), default=0)
    if depth < 2:
        return []
    out = []
    for i in range(depth):
        points = [r["steps"][i] for r in rows if len(r.get("steps", [])) > i]
        errors = [p["error"] for p in points if p["error"] is not None]
        ratios = [p["compression"] for p in points if p["compression"] is not None]
        held = [p["validation_error"] for p in points]
        if not errors or not ratios:
            continue
        out.append({"step": i + 1, "n": len(points), "compression": statistics.median(ratios),
                    "error": statistics.median(errors), "error_min": min(errors), "error_max": max(errors),
                    "validation_error": statistics.median(held) if all(v is not None for v in held) else None})
    return out


def write_frontier(result: dict[str, Any], out: Path) -> list[Path]:
    """frontier.csv (every seed's points) and frontier.png (a curve per seed, the published points) in ``out``;
    nothing when the runs have no frontier."""
    if not result.get("frontier"):
        return []
    from magprune.analysis.plots import plot_frontier

    lines = ["seed,step,compression,test_error,validation_error"]
    for row in result["rows"]:
        for p in row.get("steps", []):
            held = "" if p["validation_error"] is None else f"{p['validation_error']:.6g}"
            lines.append(f"{row['seed']},{p['step']},{p['compression']:.6g},{p['error']:.6g},{held}")
    write_atomic(out / "frontier.csv", ("\n".join(lines) + "\n").encode())
    curves = {f"seed {row['seed']}": [(p["compression"], p["error"]) for p in row.get("steps", [])
                                      if p["compression"] is not None and p["error"] is not None]
              for row in result["rows"]}
    # the published points are MNIST's: drawn only beside MNIST runs
    references = FRONTIER_REFERENCES.get(result["model"], ()) if result.get("dataset") == "mnist" else ()
    plot_frontier(curves, out / "frontier.png", references=references,
                  dense=[r["error_before"] for r in result["rows"] if r.get("error_before") is not None],
                  title=f"{result['name']}: test error vs compression, {len(result['rows'])} seed(s)")
    return [out / "frontier.csv", out / "frontier.png"]


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """:func:`spread` of every metric that all the rows report."""
    out = {}
    for key in SEED_METRICS:
        values = [r[key] for r in rows]
        if values and all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            out[key] = spread(values)
    return out


def _same_config(run_dir: Path, config: ExperimentConfig) -> str | None:
    """None if ``run_dir`` was started from ``config``, else a sentence naming the first difference."""
    try:
        saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())).to_dict()
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return f"its config.yaml cannot be read ({exc})"
    wanted = config.to_dict()
    for key in wanted:
        if saved.get(key) != wanted[key]:
            return f"its config differs in {key!r}: {saved.get(key)!r} there, {wanted[key]!r} now"
    return None


def run_seeds(config: ExperimentConfig, out: str | Path, seeds: Sequence[int], *, data_dir: str | None = None,
              progress: bool = True, echo: Callable[[str], None] = print, force: bool = False,
              command: str | None = None) -> dict[str, Any]:
    """Run ``config`` once per seed into ``out/seed-N`` and write ``out/seeds.json`` and ``out/seeds.md``.

    Rerunning the same command continues: a seed whose run finished (summary.json) is read back, one that was
    interrupted resumes from its last checkpoint. A seed directory holding a run of another config is refused
    (``force`` starts every seed afresh instead).
    """
    out = Path(out)
    rows = []
    for seed in seeds:
        run_dir = seed_dir(out, seed)
        seeded = dataclasses.replace(config, seed=seed)
        started = (run_dir / "config.yaml").is_file()
        if started and not force:
            problem = _same_config(run_dir, seeded)
            if problem is not None:
                raise RunError(f"{run_dir} holds another run: {problem}; pass --force to start the seeds afresh "
                               "or choose another --out")
        if started and not force and (run_dir / "summary.json").is_file():
            echo(f"seed {seed}: finished run in {run_dir}, read back")
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            resume = started and not force and (run_dir / "checkpoints" / "resume.pt").is_file()
            echo(f"seed {seed}: {'resuming' if resume else 'running'} into {run_dir}")
            summary = run_experiment(seeded, run_dir, data_dir=data_dir, progress=progress, echo=echo, resume=resume)
        rows.append(seed_row(seed, summary))
    result = {"name": config.name, "model": config.model.name, "dataset": config.data.dataset,
              "validation": config.data.validation, "seeds": list(seeds), "command": command, "rows": rows,
              "spread": aggregate(rows), "frontier": frontier(rows), "machine": machine_info()}
    write_atomic(out / "seeds.json", (json.dumps(result, indent=2) + "\n").encode())
    write_atomic(out / "seeds.md", render_seeds(result).encode())
    write_frontier(result, out)
    echo(render_seeds(result))
    return result


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key in _PERCENT:
        return f"{100 * value:.2f}%"
    return f"{value:.1f}x" if key == "compression" else f"{value:.0f}"


def render_seeds(result: dict[str, Any]) -> str:
    """seeds.md: one row per seed, then mean ± std and median of every metric all seeds report."""
    keys = [k for k in SEED_METRICS if any(r.get(k) is not None for r in result["rows"])]
    lines = [f"# {result['name']}: {result['model']} on {result['dataset']}, seeds {result['seeds']}", ""]
    if result.get("command"):
        lines += [f"`{result['command']}`", ""]
    lines += ["| seed | " + " | ".join(_TITLES[k] for k in keys) + " |",
              "| ---: | " + " | ".join("---:" for _ in keys) + " |"]
    for row in result["rows"]:
        lines.append(f"| {row['seed']} | " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |")
    spreads = result["spread"]
    for label, field in (("mean ± std", "mean"), ("median", "median")):
        cells = []
        for k in keys:
            if k not in spreads:
                cells.append("-")
            elif field == "mean":
                scale = 100 if k in _PERCENT else 1
                cells.append(f"{_cell(k, spreads[k]['mean'])} ± {scale * spreads[k]['std']:.2f}")
            else:
                cells.append(_cell(k, spreads[k]["median"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.get("frontier"):
        lines += ["", "Iterative frontier (each prune step after its retraining; frontier.png, every seed's points in "
                  "frontier.csv):", "", "| step | seeds | compression (median) | test error (median) | test error "
                  "(range) | val. error (median) |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p in result["frontier"]:
            held = "-" if p["validation_error"] is None else f"{100 * p['validation_error']:.2f}%"
            lines.append(f"| {p['step']} | {p['n']} | {p['compression']:.1f}x | {100 * p['error']:.2f}% | "
                         f"{100 * p['error_min']:.2f}-{100 * p['error_max']:.2f}% | {held} |")
    machine = result["machine"]
    load = machine.get("load_average")
    lines += ["", f"std is the sample standard deviation over seeds (in the column's unit: percentage points for "
              f"errors). Machine: {describe(machine)}; load average when "
              f"written {'/'.join(f'{v:.2f}' for v in load) if load else 'unknown'}.", ""]
    return "\n".join(lines)
