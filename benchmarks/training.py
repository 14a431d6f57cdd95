"""Benchmark: whole retraining steps of dense, masked-dense (the Pruner's default) and sparse-compute training
(magprune.sparse_compute), side by side in one run.

A step is zero_grad, forward, loss, backward, optimizer step. The three variants start from the same weights and
are timed in interleaved rounds in a rotating order; each round's time is divided by the same round's dense time,
and the table gives the median and the range of those ratios over the rounds (the machine may be shared: a ratio
taken within one round is far less noisy than a time).

    python benchmarks/training.py            # full run
    python benchmarks/training.py --quick    # smoke run (3 rounds, the AlexNet MLP at batch 64 only)
    python benchmarks/training.py --threads 1 --network lenet-300-100   # as the pipeline's LeNet configs train
    python benchmarks/training.py --convs    # single convolutions: forward + both gradients, dense against sparse

Writes benchmarks/results/<LLVM host CPU>/training[_quick].{json,md} with the machine (magprune.environment).
Runs under torch's OpenMP settings as the user has them (OMP_WAIT_POLICY is recorded): the kernels run on
torch's own OpenMP team (magprune.kernels.pool), so torch's threads spinning after an op no longer take the
cores from them; results before 2026-12-03 were measured with OMP_WAIT_POLICY=PASSIVE, which slowed the
dense steps (see docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import os
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


def interleaved(step, variants: tuple[str, ...], rounds: int, reference: str = "dense") \
        -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(ms per round, per-round ratio to ``reference``) of ``step(variant)`` for each variant, after two warm-up calls
    each (the first compile kernels, build plans, create optimizer state), in ``rounds`` rounds in a rotating
    order."""
    for variant in variants:
        step(variant)
        step(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times[variant].append(step(variant))
    ratios = {v: [t / d for t, d in zip(times[v], times[reference], strict=True)] for v in variants if v != reference}
    return times, ratios


def timed_steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                repeat: int) -> float:
    """ms per step, averaged over ``repeat`` back-to-back steps (one 2-5 ms step alone jitters by +-50% on the
    2-core machine)."""
    start = time.perf_counter()
    for _ in range(repeat):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) * 1e3 / repeat


def bench_case(network: str, optimizer_name: str, batch: int, rounds: int) -> dict:
    shape = {"lenet-300-100": (784,), "lenet-5": (1, 28, 28), "alexnet-mlp": (9216,)}[network]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    variants = VARIANTS + ((CONV_VARIANT,) if network == "lenet-5" else ())
    built = {v: build(network, v, optimizer_name) for v in variants}

    repeat = STEPS_PER_ROUND[network]
    times, ratios = interleaved(lambda v: timed_steps(*built[v], x, y, repeat), variants, rounds)
    return {"network": network, "optimizer": optimizer_name, "batch": batch, "rounds": rounds,
            "steps_per_round": repeat,
            "ms_min": {v: min(t) for v, t in times.items()},
            "ms_median": {v: statistics.median(t) for v, t in times.items()},
            "ratio_median": {v: statistics.median(r) for v, r in ratios.items()},
            "ratio_range": {v: [min(r), max(r)] for v, r in ratios.items()},
            "target": TARGETS[network] if batch == 64 else None}


# (name, in, out, kernel, padding, image side, batch, density): LeNet-5's conv2 and VGG-16's 3x3 layers at Han's
# densities (reference/han2015.md), plus VGG's conv5_2 at lower densities to find where sparse starts to pay
CONV_CASES = [("lenet-5 conv2", 20, 50, 5, 0, 12, 64, 0.12), ("lenet-5 conv2", 20, 50, 5, 0, 12, 64, 0.30),
              ("vgg-16 conv1_2", 64, 64, 3, 1, 224, 1, 0.22), ("vgg-16 conv3_2", 256, 256, 3, 1, 56, 4, 0.24),
              ("vgg-16 conv4_2", 512, 512, 3, 1, 28, 8, 0.27), ("vgg-16 conv5_1", 512, 512, 3, 1, 14, 16, 0.35),
              ("vgg-16 conv5_2", 512, 512, 3, 1, 14, 16, 0.29), ("vgg-16 conv5_2", 512, 512, 3, 1, 14, 16, 0.20),
              ("vgg-16 conv5_2", 512, 512, 3, 1, 14, 16, 0.10)]


def bench_conv(case: tuple, rounds: int) -> dict:
    """Forward and both gradients of one convolution, dense (oneDNN, the weight masked) against sparse compute."""
    name, c_in, c_out, k, pad, side, batch, density = case
    torch.manual_seed(0)
    dense = nn.Conv2d(c_in, c_out, k, padding=pad)
    sparse = nn.Conv2d(c_in, c_out, k, padding=pad)
    pruner = magprune.Pruner(sparse)
    pruner.prune(magprune.LayerSparsity({"weight": 1 - density}))
    with torch.no_grad():
        dense.load_state_dict(sparse.state_dict())
    magprune.sparse_compute(sparse, pruner, ["weight"], conv_max_density=1.0)
    x = torch.randn(batch, c_in, side, side, requires_grad=True)
    dy = torch.randn(batch, c_out, side + 2 * pad - k + 1, side + 2 * pad - k + 1)
    layers = {"dense": dense, "sparse": sparse}

    def run(variant: str) -> float:
        start = time.perf_counter()
        layers[variant](x).backward(dy)
        return (time.perf_counter() - start) * 1e3

    times, ratio = interleaved(run, tuple(layers), rounds)
    ratios = ratio["sparse"]
    return {"layer": name, "shape": f"{c_in}->{c_out} {k}x{k} pad {pad}", "input": f"{batch}x{c_in}x{side}x{side}",
            "density": density, "rounds": rounds, "ms_median": {v: statistics.median(t) for v, t in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


TILE_CASES = [("lenet-300-100", 64), ("lenet-300-100", 256), ("alexnet-mlp", 64), ("alexnet-mlp", 256)]


def bench_tiles(network: str, batch: int, rounds: int) -> dict:
    """The sparse-compute SGD-momentum step with the batched products walking L1-sized input tiles (AVX-512's
    default for input blocks over a quarter of L2, ``CSRProduct._row_major_tiles``; forced here for every layer)
    against the product's own L2-sized tiles, interleaved in one process: each model's plans are built while the
    tiles choice is patched (plans are cached)."""
    from magprune.kernels import csr

    shape = {"lenet-300-100": (784,), "alexnet-mlp": (9216,)}[network]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, *shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    repeat = STEPS_PER_ROUND[network]
    threshold = csr.L1_TILES_MIN_FRACTION
    csr.L1_TILES_MIN_FRACTION = 0.0  # the L1 tiles for every input block
    try:
        small = build(network, "sparse", "sgd-momentum")
        timed_steps(*small, x, y, 1)  # its plans, with the L1 tiles
    finally:
        csr.L1_TILES_MIN_FRACTION = threshold
    chosen = csr.CSRProduct._row_major_tiles
    csr.CSRProduct._row_major_tiles = lambda self, width: self.tiles
    try:
        large = build(network, "sparse", "sgd-momentum")
        timed_steps(*large, x, y, 1)  # its plans, with the L2 tiles
    finally:
        csr.CSRProduct._row_major_tiles = chosen
    built = {"l2-tiles": large, "l1-tiles": small}
    times, ratios = interleaved(lambda v: timed_steps(*built[v], x, y, repeat), ("l2-tiles", "l1-tiles"), rounds,
                                "l2-tiles")
    ratio = ratios["l1-tiles"]
    return {"network": network, "batch": batch, "rounds": rounds, "steps_per_round": repeat,
            "ms_median": {v: statistics.median(t) for v, t in times.items()},
            "ratio_median": statistics.median(ratio), "ratio_range": [min(ratio), max(ratio)]}


def tiles_table(rows: list[dict]) -> str:
    lines = ["| network | batch | L2 tiles ms | L1 tiles ms | L1 / L2 (median, range) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['network']} | {r['batch']} | {r['ms_median']['l2-tiles']:.2f} | {r['ms_median']['l1-tiles']:.2f} "
              f"| **{r['ratio_median']:.3f}** ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |" for r in rows]
    return "\n".join(lines)


def conv_table(rows: list[dict]) -> str:
    lines = ["| layer | shape | input | density | dense ms | sparse ms | sparse / dense (median, range) |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['shape']} | {r['input']} | {r['density']:.2f} | {r['ms_median']['dense']:.2f} | "
              f"{r['ms_median']['sparse']:.2f} | **{r['ratio_median']:.2f}** ({r['ratio_range'][0]:.2f}-"
              f"{r['ratio_range'][1]:.2f}) |" for r in rows]
    return "\n".join(lines)


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


def write_results(args: argparse.Namespace, info: dict, stem: str, rows: list[dict], cmd: str, heading: str,
                  description: str, text: str) -> None:
    """results/<LLVM host CPU>/ (or --out) <stem>.json with the machine and rows, <stem>.md: heading, command,
    description, machine and table."""
    out = args.out or RESULTS / info["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps({"machine": info, "rows": rows}, indent=1).encode())
    write_atomic(out / f"{stem}.md", (f"# {heading}\n\n`{cmd}` — {description}\n\nMachine: {describe(info)}\n\n"
                                      f"{json.dumps(info)}\n\n{text}\n").encode())


def run_cases(args: argparse.Namespace, info: dict, cases: list, bench, rows_table, default_rounds, mode: str,
              heading: str, description: str) -> None:
    """Each case's ``bench(case, rounds)`` row, printed as it comes, then the table and the machine, written by
    :func:`write_results` under the mode's stem with the command that reproduces it (``mode``: "" for whole steps,
    "convs", "tiles")."""
    rows = []
    for case in cases:
        rows.append(bench(case, args.rounds or default_rounds(case)))
        print(rows_table(rows[-1:]).splitlines()[-1], flush=True)
    info["load_average_end"] = os.getloadavg()
    text = rows_table(rows)
    print(f"\n{text}\n\n{describe(info)}; load average start {info['load_average_start']}, end "
          f"{info['load_average_end']}")
    threads = f"_{args.threads}thread" if args.threads else ""
    flags = (" --quick" if args.quick else "") + (f" --rounds {args.rounds}" if args.rounds else "") + \
        (f" --threads {args.threads}" if args.threads else "")
    if mode:  # single layers: --network and --batch do not apply
        stem, flags = f"training_{mode}" + ("_quick" if args.quick else "") + threads, f" --{mode}" + flags
    else:
        batch = f"_batch{args.batch}" if args.batch else ""
        stem = ("training_quick" if args.quick else "training") + threads + batch
        flags += "".join(f" --network {n}" for n in args.network or ()) + \
            (f" --batch {args.batch}" if args.batch else "")
    write_results(args, info, stem, rows, "python benchmarks/training.py" + flags, heading, description, text)


def machine() -> dict:
    return {**machine_info(), "load_average_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, fewer cases")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 20, AlexNet 6)")
    parser.add_argument("--network", action="append", choices=tuple(TARGETS), help="only these networks")
    parser.add_argument("--convs", action="store_true",
                        help="single convolutions instead (LeNet-5's conv2, VGG-16's 3x3 layers): forward and both "
                        "gradients, dense against sparse compute")
    parser.add_argument("--batch", type=int, default=None, help="this batch size for every case (default 64, the "
                        "MLP also 256)")
    parser.add_argument("--tiles", action="store_true",
                        help="the sparse-compute step with L1-sized input tiles (AVX-512 default) against L2-sized "
                        "ones, interleaved")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for torch and the kernels (default: torch's, the cores); the pipeline's "
                        "LeNet configs train at 1 (train.threads)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU>/)")
    args = parser.parse_args()
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = machine()
    if args.convs:
        main_convs(args, info)
        return
    if args.tiles:
        main_tiles(args, info)
        return
    cases = [(net, opt, 64) for net in ("lenet-300-100", "lenet-5") for opt in OPTIMIZERS]
    cases += [("alexnet-mlp", opt, batch) for opt in OPTIMIZERS for batch in (64, 256)]
    if args.quick:
        cases = [c for c in cases if c[0] != "alexnet-mlp" or c[2] == 64]
    if args.network:
        cases = [c for c in cases if c[0] in args.network]
    if args.batch is not None:
        cases = list(dict.fromkeys((net, opt, args.batch) for net, opt, _ in cases))
    run_cases(args, info, cases, lambda case, rounds: bench_case(*case, rounds), table,
              lambda case: 3 if args.quick else 6 if case[0] == "alexnet-mlp" else 20, "",
              "Retraining step benchmark",
              "whole steps (zero_grad, forward, loss, backward, optimizer step), variants interleaved; ms are "
              "medians over rounds, ratios are per-round time / the same round's dense time (median and range "
              "over rounds; a round is 10 steps of each LeNet-300-100 variant, 3 of LeNet-5, 1 of the MLP; lower "
              "is better).")


def main_convs(args: argparse.Namespace, info: dict) -> None:
    run_cases(args, info, CONV_CASES[:3] if args.quick else CONV_CASES, bench_conv, conv_table,
              lambda case: 3 if args.quick else 10, "convs", "Sparse convolution benchmark",
              "one convolution's forward and both gradients (input and weight), dense (oneDNN, the weight "
              "masked) against sparse compute (stride 1: the direct flat products), interleaved; ms are medians "
              "over rounds, ratios per-round sparse / dense time (median and range; lower is better).")


def main_tiles(args: argparse.Namespace, info: dict) -> None:
    run_cases(args, info, TILE_CASES[:1] if args.quick else TILE_CASES,
              lambda case, rounds: bench_tiles(*case, rounds), tiles_table,
              lambda case: 3 if args.quick else 10 if case[0] == "alexnet-mlp" else 40, "tiles",
              "Input tiles of the sparse-compute products",
              "whole sparse-compute SGD-momentum steps with the batched products walking L1-sized input tiles "
              "(per-tile row pointers over the row-major values; the AVX-512 default) against the product's own "
              "L2-sized tiles, interleaved in one process; ms are medians over rounds, ratios per-round L1 / L2 "
              "time (median and range; lower means the L1 tiles are faster).")


if __name__ == "__main__":
    main()
