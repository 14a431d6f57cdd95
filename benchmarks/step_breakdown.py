"""Where a LeNet-300-100 retraining step's time goes: zero_grad, forward + loss, backward and optimizer step of the
dense, masked-dense and sparse-compute variants, of a "free kernels" model whose fc1 and fc2 are sparse-compute
layers without kernels (an autograd function over a compact weight and a bias, outputs in the batch-minor layout,
fresh gradients for both, nothing computed): the floor that no kernel of this design can go below, and of a "free
layers" model whose fc1 and fc2 cost nothing at all (a fixed output, no parameters to step): the rest of the network
(ReLU, fc3, the loss, their gradients, the optimizer over fc3) and torch's per-op cost.

    python benchmarks/step_breakdown.py                  # SGD-momentum and Adam, batch 64, 15 rounds
    python benchmarks/step_breakdown.py --quick          # 3 rounds, SGD-momentum only

Variants are timed in interleaved rounds (50 steps of each per round, in a rotating order); each phase is the
median over rounds of its mean per step. Writes benchmarks/results/<LLVM host CPU>/step_breakdown[_quick].{json,md}
with the machine (magprune.environment).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from training import OPTIMIZERS, RESULTS, build, timed_steps

from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

PHASES = ("zero_grad", "forward", "backward", "step")
VARIANTS = ("dense", "masked", "sparse", "free kernels", "free layers")
STEPS = 50


class _Free(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, None


class FreeLinear(nn.Module):
    """A Linear layer that costs nothing: its output is fixed, its weight gets no gradient."""

    def __init__(self, batch: int, n_out: int, kept: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(kept))
        self.out = torch.randn(batch, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Free.apply(x, self.weight, self.out)


def free_layers(optimizer_name: str, batch: int):
    model, _ = build("lenet-300-100", "dense", optimizer_name)
    model.fc1, model.fc2 = FreeLinear(batch, 300, 18816), FreeLinear(batch, 100, 2700)
    return model, OPTIMIZERS[optimizer_name](model.parameters())


class _FreeKernels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, layer: FreeKernelsLinear):
        ctx.layer = layer
        return layer.out.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        grad_x = layer.grad_x.t() if ctx.needs_input_grad[0] else None
        return grad_x, torch.empty(layer.values.shape[0]), torch.empty(layer.bias.shape[0]), None


class FreeKernelsLinear(nn.Module):
    """A sparse-compute Linear layer without its kernels: an autograd function over a compact weight of the kept
    entries and a bias, returning its output in the batch-minor layout and fresh gradients for both parameters,
    computing nothing. What the sparse layer costs besides its kernels and their Python: the floor of this design."""

    def __init__(self, batch: int, n_in: int, n_out: int, kept: int) -> None:
        super().__init__()
        self.values, self.bias = nn.Parameter(torch.randn(kept) * 0.01), nn.Parameter(torch.zeros(n_out))
        self.out, self.grad_x = torch.randn(n_out, batch), torch.randn(n_in, batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FreeKernels.apply(x, self.values, self.bias, self)


def free_kernels(optimizer_name: str, batch: int):
    model, _ = build("lenet-300-100", "dense", optimizer_name)
    model.fc1, model.fc2 = FreeKernelsLinear(batch, 784, 300, 18816), FreeKernelsLinear(batch, 300, 100, 2700)
    return model, OPTIMIZERS[optimizer_name](model.parameters())


def breakdown(optimizer_name: str, batch: int, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    built = {v: build("lenet-300-100", v, optimizer_name) for v in VARIANTS[:3]}
    built["free kernels"] = free_kernels(optimizer_name, batch)
    built["free layers"] = free_layers(optimizer_name, batch)

    def run(variant: str, steps: int) -> list[float]:
        model, optimizer = built[variant]
        total = [0.0] * len(PHASES)
        for _ in range(steps):
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            t1 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            for i, (a, b) in enumerate(((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                total[i] += (b - a) * 1e6 / steps
        return total

    for variant in VARIANTS:
        run(variant, 10)
    per_round: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        shift = r % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            per_round[variant].append(run(variant, STEPS))
    us = {v: {p: statistics.median(t[i] for t in per_round[v]) for i, p in enumerate(PHASES)} for v in VARIANTS}
    for v in VARIANTS:
        us[v]["total"] = statistics.median(sum(t) for t in per_round[v])
    return {"optimizer": optimizer_name, "batch": batch, "rounds": rounds, "steps_per_round": STEPS, "us": us}


class _Stopwatch:
    """Forward hooks recording each child module's forward time."""

    def __init__(self, model: nn.Module) -> None:
        self.times: dict[str, list[float]] = {}
        self.started: dict[str, float] = {}
        for name, module in model.named_children():
            module.register_forward_pre_hook(self.pre(name))
            module.register_forward_hook(self.post(name))

    def pre(self, name: str):
        return lambda module, args: self.started.__setitem__(name, time.perf_counter())

    def post(self, name: str):
        return lambda module, args, out: self.times.setdefault(name, []).append(
            time.perf_counter() - self.started[name])


def layer_times(optimizer_name: str, batch: int, steps: int = 300) -> dict[str, dict[str, float]]:
    """Median forward time (us) of each child module inside whole steps (forward hooks), dense and sparse."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 784, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    found = {}
    for variant in ("dense", "sparse"):
        model, optimizer = build("lenet-300-100", variant, optimizer_name)
        watch = _Stopwatch(model)
        timed_steps(model, optimizer, x, y, 20)  # warm-up: kernels compiled, plans built, optimizer state made
        watch.times.clear()
        timed_steps(model, optimizer, x, y, steps)
        found[variant] = {n: statistics.median(t) * 1e6 for n, t in watch.times.items()}
    return found


def kernel_times(batch: int, repeat: int = 300) -> dict[str, dict[str, float]]:
    """Median time (us) of each sparse layer's three kernel plans alone, inputs in cache: forward, input gradient
    (W^T dy) and weight gradient (SDDMM), at this batch."""
    import numpy as np

    model, _ = build("lenet-300-100", "sparse", "sgd-momentum")
    m = -(-batch // 8) * 8  # the kernels' columns: the batch rounded up to 8
    lead = m + 16  # at least the floats per row the layer's arrays have (m, or m + 16 past 64): room enough
    found = {}
    for name, module in model.named_children():
        layer = getattr(module, "_magprune_sparse", None)
        if layer is None:
            continue
        structure = layer.structure
        n_out, n_in = structure.shape
        forward, transposed, sampled = structure.plans(m, torch.get_num_threads())
        rng = np.random.default_rng(0)
        xt = rng.standard_normal((n_in, lead)).astype(np.float32)
        dyt = rng.standard_normal((n_out, lead)).astype(np.float32)
        out, gx = np.zeros((n_out, lead), np.float32), np.zeros((n_in, lead), np.float32)
        gv = np.zeros(structure.nnz, np.float32)
        calls = {"forward": (forward, (xt.ctypes.data, out.ctypes.data)),
                 "input gradient": (transposed, (dyt.ctypes.data, gx.ctypes.data)),
                 "weight gradient": (sampled, (xt.ctypes.data, gv.ctypes.data, dyt.ctypes.data))}
        found[name] = {}
        for what, (plan, addresses) in calls.items():
            samples = []
            for i in range(repeat + 20):
                start = time.perf_counter()
                plan.run(*addresses)
                if i >= 20:
                    samples.append(time.perf_counter() - start)
            found[name][what] = statistics.median(samples) * 1e6
    return found


def layers_table(layers: dict[str, dict[str, float]], kernels: dict[str, dict[str, float]]) -> str:
    names = list(layers["dense"])
    lines = ["| module | dense forward us | sparse forward us | sparse kernels alone: forward / input gradient / "
             "weight gradient us |", "|---|---:|---:|---:|"]
    for n in names:
        k = kernels.get(n)
        alone = "" if k is None else " / ".join(f"{k[w]:.0f}" for w in ("forward", "input gradient", "weight gradient"))
        lines.append(f"| {n} | {layers['dense'][n]:.1f} | {layers['sparse'][n]:.1f} | {alone} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| optimizer | variant | zero_grad us | forward + loss us | backward us | step us | total us | "
             "total / dense |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        dense = r["us"]["dense"]["total"]
        for v in VARIANTS:
            u = r["us"][v]
            lines.append(f"| {r['optimizer']} | {v} | {u['zero_grad']:.0f} | {u['forward']:.0f} | {u['backward']:.0f} "
                         f"| {u['step']:.0f} | {u['total']:.0f} | {u['total'] / dense:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, SGD-momentum only")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU>/)")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    info = {**machine_info(), "load_average_start": os.getloadavg()}
    rounds = args.rounds or (3 if args.quick else 15)
    rows = [breakdown(name, args.batch, rounds) for name in (("sgd-momentum",) if args.quick else OPTIMIZERS)]
    layers, kernels = layer_times("sgd-momentum", args.batch), kernel_times(args.batch)
    info["load_average_end"] = os.getloadavg()
    text = table(rows) + "\n\nForward time of each module inside whole SGD-momentum steps (forward hooks, median of " \
        "300 steps), and the sparse layers' kernel plans timed alone with their inputs in cache (median of 300):\n\n" \
        + layers_table(layers, kernels)
    print(f"{text}\n\n{describe(info)}")
    out = args.out or RESULTS / info["llvm_host_cpu"]
    stem = "step_breakdown" + ("_quick" if args.quick else "")
    write_atomic(out / f"{stem}.json", json.dumps({"machine": info, "rows": rows, "layer_forward_us": layers,
                                                   "kernel_us": kernels}, indent=1).encode())
    cmd = "python benchmarks/step_breakdown.py" + (" --quick" if args.quick else "") + \
        (f" --batch {args.batch}" if args.batch != 64 else "")
    write_atomic(out / f"{stem}.md", (
        f"# Where a LeNet-300-100 retraining step goes\n\n`{cmd}` — per phase, median over {rounds} interleaved "
        f"rounds of the mean of {STEPS} steps, microseconds; \"free kernels\": fc1 and fc2 are sparse-compute layers "
        "without their kernels (an autograd function over compact weights and a bias, batch-minor outputs, fresh "
        "gradients, nothing computed): the floor of this design for any kernel; \"free layers\": fc1 and fc2 cost "
        "nothing at all (a fixed output, no parameters to step).\n\n"
        f"Machine: {describe(info)}\n\n{json.dumps(info)}\n\n{text}\n").encode())


if __name__ == "__main__":
    main()
