"""Benchmark: whole retraining steps of dense, masked-dense (the Pruner's default) and sparse-compute training
(magprune.sparse_compute), side by side in one run.

A step is zero_grad, forward, loss, backward, optimizer step. The three variants start from the same weights and
are timed in interleaved rounds in a rotating order; each round's time is divided by the same round's dense time,
and the table gives the median and the range of those ratios over the rounds (the machine may be shared: a ratio
taken within one round is far less noisy than a time).

    python benchmarks/training.py            # full run
    python benchmarks/training.py --quick    # smoke run (3 rounds, the AlexNet MLP at batch 64 only)
    python benchmarks/training.py --threads 1 --network lenet-300-100   # as the pipeline's LeNet configs train

Writes benchmarks/results/<LLVM host CPU>/training[_quick].{json,md} with the machine (magprune.environment). Sets
OMP_WAIT_POLICY=PASSIVE unless set: torch's OpenMP threads otherwise spin after each op and take the cores from
the sparse kernels' threads (see docs/deploy.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import magprune
from magprune.criteria import HAN2015_DENSITIES
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/
OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
VARIANTS = ("dense", "masked", "sparse")
CONV_VARIANT = "sparse-fc"  # LeNet-5 only: the fully connected layers sparse, conv2 (12% kept) dense
# (conv_max_density=0; by default conv2 is computed sparse too)
TARGETS = {"lenet-300-100": 0.6, "lenet-5": 0.8, "alexnet-mlp": 0.35}  # sparse step / dense step (batch 64)
STEPS_PER_ROUND = {"lenet-300-100": 10, "lenet-5": 3, "alexnet-mlp": 1}


def alexnet_mlp() -> nn.Module:
    """AlexNet's classifier sized MLP: 9216-4096-4096-1000."""
    return nn.Sequential(nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000))


def build(network: str, variant: str, optimizer_name: str):
    torch.manual_seed(0)
    if network == "alexnet-mlp":
        model, densities = alexnet_mlp(), {"0.weight": 0.09, "2.weight": 0.09, "4.weight": 0.25}
    else:
        model, densities = magprune.create_model(network), HAN2015_DENSITIES[network]
    if variant != "dense":
        pruner = magprune.Pruner(model)
        pruner.prune(magprune.LayerSparsity({n: 1 - d for n, d in densities.items()}))
        if variant == "sparse":
            magprune.sparse_compute(model, pruner)
        if variant == CONV_VARIANT:
            magprune.sparse_compute(model, pruner, conv_max_density=0.0)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    if variant != "dense":
        pruner.attach(optimizer)
    return model, optimizer


def bench_case(network: str, optimizer_name: str, batch: int, rounds: int) -> dict:
    shape = {"lenet-300-100": (784,), "lenet-5": (1, 28, 28), "alexnet-mlp": (9216,)}[network]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    variants = VARIANTS + ((CONV_VARIANT,) if network == "lenet-5" else ())
    built = {v: build(network, v, optimizer_name) for v in variants}

    repeat = STEPS_PER_ROUND[network]

    def step(variant: str) -> float:
        """ms per step, averaged over the round's ``repeat`` back-to-back steps (one 2-5 ms step alone jitters by
        +-50% on the 2-core machine)."""
        model, optimizer = built[variant]
        start = time.perf_counter()
        for _ in range(repeat):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return (time.perf_counter() - start) * 1e3 / repeat

    for variant in variants:  # warm-up: first calls compile kernels, build plans, create optimizer state
        step(variant)
        step(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times[variant].append(step(variant))
    ratios = {v: [t / d for t, d in zip(times[v], times["dense"], strict=True)] for v in variants if v != "dense"}
    return {"network": network, "optimizer": optimizer_name, "batch": batch, "rounds": rounds,
            "steps_per_round": repeat,
            "ms_min": {v: min(t) for v, t in times.items()},
            "ms_median": {v: statistics.median(t) for v, t in times.items()},
            "ratio_median": {v: statistics.median(r) for v, r in ratios.items()},
            "ratio_range": {v: [min(r), max(r)] for v, r in ratios.items()},
            "target": TARGETS[network] if batch == 64 else None}


def table(rows: list[dict]) -> str:
    lines = ["| network | optimizer | batch | dense ms | masked ms | sparse ms | masked / dense | sparse / dense "
             "(median, range) | target | sparse, conv2 dense / dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms, med, rng = r["ms_median"], r["ratio_median"], r["ratio_range"]
        target = "" if r["target"] is None else \
            f"<= {r['target']} ({'met' if med['sparse'] <= r['target'] else 'not met'})"
        lines.append(f"| {r['network']} | {r['optimizer']} | {r['batch']} | {ms['dense']:.2f} | {ms['masked']:.2f} | "
                     f"{ms['sparse']:.2f} | {med['masked']:.2f} | **{med['sparse']:.2f}** "
                     f"({rng['sparse'][0]:.2f}-{rng['sparse'][1]:.2f}) | {target} | "
                     + (f"{med[CONV_VARIANT]:.2f} ({rng[CONV_VARIANT][0]:.2f}-{rng[CONV_VARIANT][1]:.2f}) |"
                        if CONV_VARIANT in med else "– |"))
    return "\n".join(lines)


def machine() -> dict:
    return {**machine_info(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer cases")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 20, AlexNet 6)")
    parser.add_argument("--network", action="append", choices=tuple(TARGETS), help="only these networks")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and the kernels (default: torch's, the cores); the pipeline's "
                        "LeNet configs train at 1 (train.threads)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU>/)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = machine()
    cases = [(net, opt, 64) for net in ("lenet-300-100", "lenet-5") for opt in OPTIMIZERS]
    cases += [("alexnet-mlp", opt, batch) for opt in OPTIMIZERS for batch in (64, 256)]
    if args.quick:
        cases = [c for c in cases if c[0] != "alexnet-mlp" or c[2] == 64]
    if args.network:
        cases = [c for c in cases if c[0] in args.network]
    rows = []
    for network, optimizer_name, batch in cases:
        rounds = args.rounds or (3 if args.quick else 6 if network == "alexnet-mlp" else 20)
        rows.append(bench_case(network, optimizer_name, batch, rounds))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    info["load_average_end"] = os.getloadavg()
    text = table(rows)
    print(f"\n{text}\n\n{describe(info)}; load average start {info['load_average_start']}, end "
          f"{info['load_average_end']}")
    out = args.out or RESULTS / info["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    stem = ("training_quick" if args.quick else "training") + (f"_{args.threads}thread" if args.threads else "")
    write_atomic(out / f"{stem}.json", json.dumps({"machine": info, "rows": rows}, indent=1).encode())
    cmd = "python benchmarks/training.py" + (" --quick" if args.quick else "") + \
        (f" --threads {args.threads}" if args.threads else "") + "".join(f" --network {n}" for n in args.network or ())
    write_atomic(out / f"{stem}.md", (
        f"# Retraining step benchmark\n\n`{cmd}` — whole steps (zero_grad, forward, loss, backward, optimizer step), "
        "variants interleaved; ms are medians over rounds, ratios are per-round time / the same round's dense time "
        "(median and range over rounds; a round is 10 steps of each LeNet-300-100 variant, 3 of LeNet-5, 1 of the "
        f"MLP; lower is better).\n\nMachine: {describe(info)}\n\n{json.dumps(info)}\n\n"
        f"{text}\n").encode())


if __name__ == "__main__":
    main()
