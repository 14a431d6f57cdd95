"""Where a LeNet-5 run's time goes: forward, loss + L2 penalty, backward, optimizer step, test-set evaluation.

Times the pipeline's own training step (batch 64, SGD momentum, L2 on the prunable weights as the pipeline applies
it, its gradient added after backward by ``magprune.retrain.add_penalty_gradient``, a Pruner attached as in
retraining) phase by phase, and the evaluation of a 10,000-image test set, at 1 and 2 torch threads and a few
variants (channels_last; L2 through ``weight_penalty`` in the loss as before 2026-12-02, or as SGD weight decay).
Variants run in interleaved rounds, in a shuffled order, so a shared machine's
load hits them alike; each reports the median over rounds. From the per-step and per-evaluation times it projects a
whole ``configs/lenet-5-mnist.yaml`` run as the config stands (its dense and retraining epochs of 938 steps, one
test-set evaluation per epoch and one after each pruning).

    python benchmarks/lenet5_time.py            # 300 steps per variant and round
    python benchmarks/lenet5_time.py --quick    # smoke run

Writes benchmarks/results/<LLVM host CPU>/lenet5-time.json and lenet5-time.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from magprune import Pruner, create_model, han2015
from magprune.environment import describe, machine_info
from magprune.experiment.config import load_config
from magprune.fileio import write_atomic
from magprune.retrain import add_penalty_gradient, weight_penalty

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("forward", "loss", "backward", "optimizer")
STEPS_PER_EPOCH = 938  # ceil(60000 / 64)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "lenet-5-mnist.yaml"


def run_shape() -> tuple[int, int]:
    """(epochs, test-set evaluations) of a whole CONFIG run: dense and retraining epochs, one evaluation per epoch
    and one after each pruning step."""
    config = load_config(CONFIG)
    epochs = config.train.epochs + sum(step.retrain.epochs for step in config.prune)
    return epochs, epochs + len(config.prune)
VARIANTS = {  # name: (threads, how L2 is applied, channels_last)
    "1 thread": (1, "grad", False),
    "2 threads": (2, "grad", False),
    "2 threads, channels_last": (2, "grad", True),
    "2 threads, channels_last, L2 in the loss (before 2026-12-02)": (2, "loss", True),
    "2 threads, channels_last, L2 as SGD weight decay": (2, "decay", True),
}
# L2 ("grad"): the pipeline's way since 2026-12-02, its gradient added after backward (add_penalty_gradient);
# "loss": weight_penalty in the loss, through autograd; "decay": SGD's weight_decay on the same weights


class Setup:
    def __init__(self, threads: int, l2: str, channels_last: bool, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.threads, self.l2, self.channels_last = threads, l2, channels_last
        self.model = create_model("lenet-5")
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.pruner = Pruner(self.model)
        self.pruner.prune(han2015("lenet-5"))
        penalized = list(self.pruner.params.values())
        self.penalized = penalized
        if l2 == "decay":  # the same L2 gradient (strength * w) added by SGD, on the same weights only
            ids = {id(p) for p in penalized}
            others = [p for p in self.model.parameters() if id(p) not in ids]
            groups = [{"params": penalized, "weight_decay": 5e-4}, {"params": others}]
            self.optimizer = torch.optim.SGD(groups, lr=0.001, momentum=0.9)
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)
        self.pruner.attach(self.optimizer)

    def train(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
        torch.set_num_threads(self.threads)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        spent = dict.fromkeys(PHASES, 0.0)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randint(0, len(y), (64,), generator=g)
            xb, yb = x[idx], y[idx]
            t0 = time.perf_counter()
            out = self.model(xb)
            t1 = time.perf_counter()
            loss = F.cross_entropy(out, yb)
            if self.l2 == "loss":
                loss = loss + weight_penalty(self.penalized, "l2", 5e-4)
            t2 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            if self.l2 == "grad":
                add_penalty_gradient(self.penalized, "l2", 5e-4)
            t3b = time.perf_counter()
            self.optimizer.step()
            t4 = time.perf_counter()
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1 + t3b - t3, t3 - t2, t4 - t3b), strict=True):
                spent[phase] += seconds
        return {phase: seconds / steps for phase, seconds in spent.items()}

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, batch_size: int = 2000) -> float:
        torch.set_num_threads(self.threads)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.eval()
        t0 = time.perf_counter()
        for start in range(0, len(x), batch_size):
            self.model(x[start:start + batch_size]).argmax(1)
        self.model.train()
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 2 rounds, 2,000 test images")
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    steps, rounds, n_test = (20, 2, 2000) if args.quick else (args.steps, args.rounds, 10_000)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(6000, 1, 28, 28, generator=g) > 0.8).float()  # MNIST-like: ~20% nonzero pixels
    y = torch.randint(0, 10, (6000,), generator=g)
    x_test = x[:n_test] if n_test <= len(x) else x.repeat(n_test // len(x) + 1, 1, 1, 1)[:n_test]
    setups = {name: Setup(*spec) for name, spec in VARIANTS.items()}
    for setup in setups.values():  # warm up (allocator, kernels' first calls)
        setup.train(x, y, 5)
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    order = list(setups)
    for r in range(rounds):
        random.Random(r).shuffle(order)
        for name in order:
            times = setups[name].train(x, y, steps)
            times["evaluate"] = setups[name].evaluate(x_test) * 10_000 / n_test
            per_round[name].append(times)
            print(f"round {r + 1}/{rounds} {name}: {1000 * sum(times[p] for p in PHASES):.1f} ms/step, "
                  f"eval {times['evaluate']:.2f} s", flush=True)
    rows = []
    epochs, evaluations = run_shape()
    for name, rounds_times in per_round.items():
        median = {k: statistics.median(t[k] for t in rounds_times) for k in (*PHASES, "evaluate")}
        step = sum(median[p] for p in PHASES)
        run = epochs * STEPS_PER_EPOCH * step + evaluations * median["evaluate"]
        rows.append({"variant": name, **{f"{p}_ms": 1000 * median[p] for p in PHASES}, "step_ms": 1000 * step,
                     "evaluate_s": median["evaluate"], "projected_run_s": run})
    info = machine_info()
    lines = ["# LeNet-5: where a run's time goes", "",
             f"`python benchmarks/lenet5_time.py {' '.join(sys.argv[1:])}` on {describe(info)}; "
             f"{steps} steps x {rounds} interleaved rounds per variant, medians. Projected run: "
             f"configs/lenet-5-mnist.yaml as it stands, {epochs} epochs x {STEPS_PER_EPOCH} steps and {evaluations} "
             "10,000-image evaluations (one per epoch, one after each pruning).", "",
             "| variant | forward ms | loss+L2 ms | backward ms | optimizer step ms | whole step ms | eval 10k s "
             "| projected run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['forward_ms']:.2f} | {row['loss_ms']:.2f} | {row['backward_ms']:.2f} "
                     f"| {row['optimizer_ms']:.2f} | {row['step_ms']:.2f} | {row['evaluate_s']:.2f} | "
                     f"{row['projected_run_s'] / 60:.1f} min |")
    lines += ["", f"Load average at the end: {'/'.join(f'{v:.2f}' for v in info['load_average'] or [])}.", ""]
    text = "\n".join(lines)
    print(text)
    folder = RESULTS / info["llvm_host_cpu"]
    stem = "lenet5-time-quick" if args.quick else "lenet5-time"
    write_atomic(folder / f"{stem}.json", (json.dumps({"machine": info, "steps": steps, "rounds": rounds,
                                                       "run_epochs": epochs, "run_evaluations": evaluations,
                                                       "rows": rows}, indent=2) + "\n").encode())
    write_atomic(folder / f"{stem}.md", text.encode())


if __name__ == "__main__":
    main()
