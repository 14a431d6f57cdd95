"""Training-step overhead of keeping pruned weights at zero: magprune vs dense vs torch.nn.utils.prune vs a naive loop.

Each variant starts from the same dense model and the same optimizer state (a few dense steps first, as when a
trained model is pruned), is pruned to Han et al.'s per-layer densities, and is timed for whole training steps
(zero_grad, forward, loss, backward, optimizer step). Variants are timed in interleaved rounds, in a shuffled order,
and each round's time is divided by the same round's dense time; the reported ratio is the median over rounds.

    python benchmarks/overhead.py            # full run (a few minutes on 2 cores)
    python benchmarks/overhead.py --quick    # smoke run

Writes benchmarks/results/<LLVM host CPU>/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

import magprune
from magprune import pruner as pruner_module
from magprune.criteria import HAN2015_DENSITIES
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/

OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
INPUTS = {"lenet-300-100": (784,), "lenet-5": (1, 28, 28)}


class Variant:
    """A model + optimizer pruned one way, with a step() that trains it one batch."""

    def __init__(self, name, model, optimizer, before_step=None):
        self.name, self.model, self.optimizer, self.before_step = name, model, optimizer, before_step
        self.zero_check = None

    def step(self, x, y):
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        if self.before_step is not None:
            self.before_step()
        self.optimizer.step()


def build_variants(network: str, optimizer_name: str, x, y, warmup: int) -> list[Variant]:
    torch.manual_seed(0)
    base = magprune.create_model(network)
    base_opt = OPTIMIZERS[optimizer_name](base.parameters())
    for _ in range(warmup):  # dense training: optimizer state exists when pruning starts
        base_opt.zero_grad()
        F.cross_entropy(base(x), y).backward()
        base_opt.step()
    densities = HAN2015_DENSITIES[network]

    def fresh():
        model = copy.deepcopy(base)
        optimizer = OPTIMIZERS[optimizer_name](model.parameters())
        optimizer.load_state_dict(copy.deepcopy(base_opt.state_dict()))
        return model, optimizer

    variants = []
    model, optimizer = fresh()
    variants.append(Variant("dense", model, optimizer))

    model, optimizer = fresh()
    pruner = magprune.Pruner(model)
    pruner.attach(optimizer)
    pruner.prune(magprune.han2015(network))
    variant = Variant("magprune", model, optimizer)
    variant.zero_check = lambda p=pruner: _zeros_held(p.params, p.masks)
    variants.append(variant)

    # Ablation: the same engine with second-moment state left at 0 at pruned positions (slow CPU sqrt of zeros).
    model, optimizer = fresh()
    pruner_zero = magprune.Pruner(model)
    saved = pruner_module.SECOND_MOMENT_FILL
    pruner_module.SECOND_MOMENT_FILL = 0.0
    try:
        pruner_zero.attach(optimizer)
        pruner_zero.prune(magprune.han2015(network))
    finally:
        pruner_module.SECOND_MOMENT_FILL = saved
    pruner_zero.refresh_every = 10**12
    variant = Variant("magprune, 2nd moments at 0", model, optimizer)
    variant.zero_check = lambda p=pruner_zero: _zeros_held(p.params, p.masks)
    variants.append(variant)

    model, optimizer = fresh()
    for layer, density in densities.items():
        torch_prune.l1_unstructured(model.get_submodule(layer), "weight", amount=round((1 - density) * 10**6) / 10**6)
    variant = Variant("torch.nn.utils.prune", model, optimizer)
    variant.zero_check = lambda m=model: _zeros_held(
        {n: m.get_submodule(n).weight for n in densities},
        {n: m.get_submodule(n).weight_mask.bool() for n in densities})
    variants.append(variant)

    model, optimizer = fresh()
    naive_masks = magprune.han2015(network)(
        {f"{n}.weight": model.get_submodule(n).weight.detach() for n in densities}, {})
    pruned_inds = []
    with torch.no_grad():
        for name, keep in naive_masks.items():
            param = model.get_parameter(name)
            param[~keep] = 0
            pruned_inds.append((param, (~keep).nonzero(as_tuple=True)))

    def zero_pruned_grads(pruned_inds=pruned_inds):
        for param, index in pruned_inds:  # the forum recipe
            param.grad.data[index] = 0

    variant = Variant("naive p.grad[idx] = 0", model, optimizer, before_step=zero_pruned_grads)
    variant.zero_check = lambda m=model: _zeros_held({n: m.get_parameter(n) for n in naive_masks}, naive_masks)
    variants.append(variant)
    return variants


def _zeros_held(params, masks) -> bool:
    return all(not params[n].detach()[~m].any() for n, m in masks.items())


def time_steps(variant: Variant, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        variant.step(x, y)
    return (time.perf_counter() - start) / steps


def run_case(network, optimizer_name, batch_size, rounds, steps, warmup) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *INPUTS[network], generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    variants = build_variants(network, optimizer_name, x, y, warmup)
    for v in variants:  # warm caches and allocator
        time_steps(v, x, y, 5)
    times = {v.name: [] for v in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            times[v.name].append(time_steps(v, x, y, steps))
    dense = times["dense"]
    rows = []
    for v in variants:
        ratios = [t / d for t, d in zip(times[v.name], dense, strict=True)]
        rows.append({
            "variant": v.name,
            "step_ms": 1e3 * statistics.median(times[v.name]),
            "ratio_vs_dense": statistics.median(ratios),
            "ratio_iqr": _iqr(ratios),
            "zeros_held": None if v.zero_check is None else v.zero_check(),
        })
    return {"network": network, "optimizer": optimizer_name, "batch_size": batch_size, "rows": rows}


def _iqr(values):
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def machine() -> dict:
    return machine_info()


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Training-step overhead of masked training",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {describe(m)}; load average before/after: {m['load_average']} / {result['loadavg_after']}  ",
        f"Batch {result['batch_size']}, {result['rounds']} interleaved rounds of {result['steps']} steps; ratio = "
        "median over rounds of (variant step time / dense step time in the same round).",
        "",
        "| network | optimizer | variant | step (ms) | x dense | IQR | pruned stay 0 |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for case in result["cases"]:
        for row in case["rows"]:
            held = "-" if row["zeros_held"] is None else ("yes" if row["zeros_held"] else "**no**")
            lines.append(f"| {case['network']} | {case['optimizer']} | {row['variant']} | {row['step_ms']:.3f} | "
                         f"{row['ratio_vs_dense']:.3f} | {row['ratio_iqr'][0]:.3f}-{row['ratio_iqr'][1]:.3f} | "
                         f"{held} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke test")
    parser.add_argument("--batch-size", type=int, default=64, help="Caffe's LeNet batch size (default 64)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU name>)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (5 if args.quick else 40)
    result = {"command": "python benchmarks/overhead.py" + (" --quick" if args.quick else ""),
              "machine": machine(), "batch_size": args.batch_size, "rounds": rounds, "steps": steps, "cases": []}
    for network in INPUTS:
        for optimizer_name in OPTIMIZERS:
            case = run_case(network, optimizer_name, args.batch_size, rounds, steps, warmup=20)
            result["cases"].append(case)
            for row in case["rows"]:
                print(f"{network:14s} {optimizer_name:13s} {row['variant']:28s} {row['step_ms']:8.3f} ms  "
                      f"x{row['ratio_vs_dense']:.3f}  zeros held: {row['zeros_held']}", flush=True)
    result["loadavg_after"] = list(os.getloadavg())
    out = args.out or RESULTS / result["machine"]["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    write_atomic(out / f"overhead{suffix}.json", json.dumps(result, indent=2).encode())
    markdown = to_markdown(result)
    write_atomic(out / f"overhead{suffix}.md", markdown.encode())
    print()
    print(markdown)
    return result


if __name__ == "__main__":
    main()
