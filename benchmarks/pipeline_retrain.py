"""Whole LeNet-300-100 retraining runs on real MNIST through the pipeline (``magprune run``), masked-dense against
sparse compute (``prune.0.retrain.compute``): wall time of each retraining epoch and the test error after it.

    python benchmarks/pipeline_retrain.py --data-dir ../shared/data/mnist               # 3 repeats, 1 thread
    python benchmarks/pipeline_retrain.py --data-dir ../shared/data/mnist --threads 2   # 2 threads

Each run is ``configs/lenet-300-100-mnist.yaml`` (Han's per-layer densities, retraining at batch 64) with
``train.epochs`` (dense training, default 2), ``prune.0.retrain.epochs`` (default 3), ``train.threads`` and
``prune.0.retrain.compute`` set, into a temporary run directory; the two modes run in alternating order, ``--repeats``
times each. An epoch's seconds (the run's metrics.jsonl) are its 938 training steps and then the evaluation of the
10,000 test images. The dense training before the prune is the same in both modes (same seed, one thread or the same
threads): the script checks that its metrics and the pruned sparsity agree, so the retraining epochs start from the
same model. Writes results/<LLVM host CPU>/pipeline_retrain_<N>thread.{json,md} (or --out) with the machine
(magprune.environment).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/
CONFIG = ROOT / "configs" / "lenet-300-100-mnist.yaml"
MODES = ("dense", "sparse")
TEST_IMAGES = 10_000


def run_once(mode: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One pipeline run in ``mode``; its dense-stage rows, the prune row's sparsity and its retraining rows."""
    out = workdir / f"{mode}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "magprune", "run", str(CONFIG), "--data-dir", str(args.data_dir), "--out",
               str(out), "--no-progress", "--set", f"train.epochs={args.dense_epochs}",
               "--set", f"prune.0.retrain.epochs={args.retrain_epochs}", "--set", f"train.threads={args.threads}",
               "--set", f"prune.0.retrain.compute={mode}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"magprune run ({mode}) failed with exit status {done.returncode}:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dense = [{k: r[k] for k in ("epoch", "train_loss", "test_error")} for r in rows if r["stage"] == "dense"]
    sparsity = [r["sparsity"] for r in rows if r["stage"] == "prune-1"]
    retrain = [r for r in rows if r["stage"] == "retrain-1"]
    if len(retrain) != args.retrain_epochs or len(sparsity) != 1:
        raise SystemExit(f"{out}/metrics.jsonl: expected {args.retrain_epochs} retraining epochs and one prune row, "
                         f"got {len(retrain)} and {len(sparsity)}")
    return {"mode": mode, "wall_seconds": wall, "dense_stage": dense, "sparsity": sparsity[0],
            "epoch_seconds": [r["seconds"] for r in retrain], "test_error": [r["test_error"] for r in retrain],
            "train_loss": [r["train_loss"] for r in retrain]}


def summarize(runs: list[dict], retrain_epochs: int) -> dict:
    """Per mode the median over repeats of each epoch's seconds; per repeat pair the sparse / dense ratio of the
    epochs after the first (the first compiles the kernels); the test errors after the last epoch."""
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    median_seconds = {m: [statistics.median(r["epoch_seconds"][e] for r in rs) for e in range(retrain_epochs)]
                      for m, rs in by_mode.items()}
    later = slice(1, None) if retrain_epochs > 1 else slice(None)
    ratios = [sum(s["epoch_seconds"][later]) / sum(d["epoch_seconds"][later])
              for d, s in zip(by_mode["dense"], by_mode["sparse"], strict=True)]
    final = {m: [r["test_error"][-1] for r in rs] for m, rs in by_mode.items()}
    reference = runs[0]
    same_start = all(r["dense_stage"] == reference["dense_stage"] and r["sparsity"] == reference["sparsity"]
                     for r in runs)
    return {"median_epoch_seconds": median_seconds, "later_epochs_ratio": ratios,
            "later_epochs_ratio_median": statistics.median(ratios), "final_test_error": final,
            "final_error_gap_images": [round(abs(s - d) * TEST_IMAGES) for d, s in
                                       zip(final["dense"], final["sparse"], strict=True)],
            "same_dense_stage_and_sparsity": same_start}


def table(runs: list[dict], summary: dict) -> str:
    epochs = len(runs[0]["epoch_seconds"])
    head = " | ".join(f"epoch {e + 1} s" for e in range(epochs))
    errors = " | ".join(f"error {e + 1}" for e in range(epochs))
    lines = [f"| repeat | mode | {head} | {errors} | run wall s |", "|---|---|" + "---:|" * (2 * epochs + 1)]
    counts = {m: 0 for m in MODES}
    for r in runs:
        counts[r["mode"]] += 1
        lines.append(f"| {counts[r['mode']]} | {r['mode']} | " + " | ".join(f"{s:.2f}" for s in r["epoch_seconds"])
                     + " | " + " | ".join(f"{100 * e:.2f}%" for e in r["test_error"]) + f" | {r['wall_seconds']:.1f} |")
    med = summary["median_epoch_seconds"]
    ratios = summary["later_epochs_ratio"]
    lines += ["", "| mode | " + head + " (median over repeats) |", "|---|" + "---:|" * epochs]
    lines += [f"| {m} | " + " | ".join(f"{s:.2f}" for s in med[m]) + " |" for m in MODES]
    lines += ["", "Sparse / dense time of the retraining epochs after the first, per repeat: "
              + ", ".join(f"{x:.2f}" for x in ratios) + f" (median **{summary['later_epochs_ratio_median']:.2f}**). "
              f"Test error after the last epoch: dense " + ", ".join(f"{100 * e:.2f}%" for e in
                                                                     summary["final_test_error"]["dense"])
              + "; sparse " + ", ".join(f"{100 * e:.2f}%" for e in summary["final_test_error"]["sparse"])
              + f" ({', '.join(map(str, summary['final_error_gap_images']))} of {TEST_IMAGES:,} images apart, per "
              f"repeat). Dense stage and pruned sparsity identical in every run: "
              f"{'yes' if summary['same_dense_stage_and_sparsity'] else 'NO'}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("MAGPRUNE_DATA"),
                        help="directory with MNIST's four IDX files (default $MAGPRUNE_DATA)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="train.threads (default 1, as the config)")
    parser.add_argument("--dense-epochs", type=int, default=2, help="train.epochs before the prune (default 2)")
    parser.add_argument("--retrain-epochs", type=int, default=3, help="prune.0.retrain.epochs (default 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU>/)")
    args = parser.parse_args()
    if args.data_dir is None or not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir must be a directory holding MNIST's IDX files, got {args.data_dir}")
    for name in ("repeats", "threads", "dense_epochs", "retrain_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # torch_threads: the runs' train.threads, not this parent process's default
    info = {**machine_info(), "torch_threads": args.threads, "load_average_start": os.getloadavg()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="magprune-pipeline-") as workdir:
        for repeat in range(args.repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                runs.append(run_once(mode, args, Path(workdir)))
                r = runs[-1]
                print(f"{mode} (repeat {repeat + 1}): epochs " + ", ".join(f"{s:.2f}" for s in r["epoch_seconds"])
                      + " s; test error " + ", ".join(f"{100 * e:.2f}%" for e in r["test_error"]), flush=True)
    info["load_average_end"] = os.getloadavg()
    summary = summarize(runs, args.retrain_epochs)
    text = table(runs, summary)
    print(f"\n{text}\n\n{describe(info)}")
    flags = f" --repeats {args.repeats}" if args.repeats != 3 else ""
    flags += f" --threads {args.threads}" + (f" --dense-epochs {args.dense_epochs}" if args.dense_epochs != 2 else "")
    flags += f" --retrain-epochs {args.retrain_epochs}" if args.retrain_epochs != 3 else ""
    cmd = f"python benchmarks/pipeline_retrain.py --data-dir <MNIST>{flags}"
    out = args.out or RESULTS / info["llvm_host_cpu"]
    stem = f"pipeline_retrain_{args.threads}thread"
    write_atomic(out / f"{stem}.json", json.dumps({"machine": info, "command": cmd, "runs": runs,
                                                   "summary": summary}, indent=1).encode())
    write_atomic(out / f"{stem}.md", (
        f"# LeNet-300-100 retraining on MNIST through the pipeline, masked-dense against sparse compute\n\n`{cmd}` — "
        f"{args.dense_epochs} dense epochs, the prune to Han's densities, {args.retrain_epochs} retraining epochs at "
        f"{args.threads} thread(s); the modes in alternating order, {args.repeats} runs each. An epoch's seconds are "
        "its training steps and the test-set evaluation; the first retraining epoch of a sparse run also compiles "
        f"the kernels.\n\nMachine: {describe(info)}\n\n{json.dumps(info)}\n\n{text}\n").encode())


if __name__ == "__main__":
    main()
