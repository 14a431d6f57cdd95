"""Benchmark: dense torch vs torch.sparse CSR vs magprune's sparse kernels (scipy for reference), per layer and
whole model, at batch 1, 32 and 256, measured side by side in one run.

    python benchmarks/inference.py [--quick]
    python benchmarks/inference.py --quantized [--quick]

Writes benchmarks/results/<LLVM host CPU>/inference[_quick].{json,md}. ``--quantized``: only the comparison
of Deep Compression's shared weights (5 bits, as Han's FC layers) on the AlexNet fc6 and VGG-16 fc6 shapes: dense
torch, the fp32 CSR kernel (SparseLinear) and the kernels reading codebook indices (QuantizedLinear), batch 1 on one
and on all threads and batch 32 on all, interleaved; writes inference_quantized[_quick].{json,md} there.

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
import warnings
from pathlib import Path

import scipy
import scipy.sparse
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import magprune
from magprune.deploy import SparseConv2d, SparseLinear, sparsify
from magprune.deploy.quantize import WeightSharing
from magprune.deploy.quantized import QuantizedLinear
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/


def timed(fns: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Run each fn once to warm up, then ``rounds`` interleaved rounds; min and median ms per fn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


def random_pruned_linear(n_in: int, n_out: int, density: float, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    magprune.Pruner(layer, ["weight"]).prune(magprune.LayerSparsity({"weight": 1 - density}))
    return layer.eval()


def layer_fns(layer: nn.Linear, x: torch.Tensor) -> dict:
    csr = layer.weight.detach().to_sparse_csr()
    bias = layer.bias.detach()[:, None]
    sp = scipy.sparse.csr_matrix(layer.weight.detach().numpy())
    b_np = layer.bias.detach().numpy()
    ours = SparseLinear(layer)
    x_np = x.numpy()
    return {"dense": lambda: layer(x), "torch_csr": lambda: torch.addmm(bias, csr, x.T).T,
            "ours": lambda: ours(x), "scipy": lambda: (sp @ x_np.T).T + b_np}


def bench_layer(label: str, layer: nn.Linear, batch: int, rounds: int) -> dict:
    x = torch.randn(batch, layer.in_features)
    with torch.inference_mode():
        fns = layer_fns(layer, x)
        torch.testing.assert_close(fns["ours"](), fns["dense"](), rtol=1e-3, atol=1e-3)
        t = timed(fns, rounds)
    density = float(layer.weight.count_nonzero()) / layer.weight.numel()
    return {"case": label, "shape": f"{layer.in_features}->{layer.out_features}", "density": round(density, 4),
            "batch": batch, "ms": {k: v["min"] for k, v in t.items()},
            "median_ms": {k: v["median"] for k, v in t.items()}}


def bench_model(name: str, input_shape: tuple[int, ...], batch: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    model = magprune.create_model(name).eval()
    magprune.Pruner(model).prune(magprune.han2015(name))
    x = torch.randn(batch, *input_shape)
    rows = []
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, inp[0].shape) and None)
             for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        for lname, module in model.named_modules():
            if isinstance(module, nn.Linear):
                rows.append(bench_layer(f"{name}/{lname}", module, batch, rounds))
            elif isinstance(module, nn.Conv2d):
                xin = torch.randn(shapes[lname])
                ours = SparseConv2d(module)
                t = timed({"dense": lambda m=module, x=xin: m(x), "ours": lambda m=ours, x=xin: m(x)}, rounds)
                density = float(module.weight.count_nonzero()) / module.weight.numel()
                rows.append({"case": f"{name}/{lname}", "shape": "x".join(map(str, module.weight.shape)),
                             "density": round(density, 4), "batch": batch, "ms": {k: v["min"] for k, v in t.items()},
                             "median_ms": {k: v["median"] for k, v in t.items()}})
        all_sparse = sparsify(model, batch_size=batch, example_input=x, min_speedup=0.0, repeats=1)
        chosen = sparsify(model, batch_size=batch, example_input=x, repeats=3)
        t = timed({"dense": lambda: model(x), "ours": lambda: all_sparse(x), "sparsify": lambda: chosen(x)}, rounds)
        converted = [d.name for d in chosen.sparsify_decisions if d.converted]
    rows.append({"case": f"{name}/whole model", "shape": "x".join(map(str, x.shape)), "density": None,
                 "batch": batch, "ms": {k: v["min"] for k, v in t.items()},
                 "median_ms": {k: v["median"] for k, v in t.items()}, "sparsify_converted": converted})
    return rows


def bench_quantized(label: str, n_in: int, n_out: int, density: float, bits: int, rounds: int) -> list[dict]:
    """Dense torch vs the fp32 CSR kernel vs the shared-weight kernel on the same (shared) weights: batch 1 on one
    and on all threads, batch 32 on all."""
    layer = random_pruned_linear(n_in, n_out, density)
    WeightSharing(layer, bits=bits)
    fp32, quantized = SparseLinear(layer), QuantizedLinear.from_linear(layer)
    rows = []
    default_threads = torch.get_num_threads()
    with torch.inference_mode():
        for batch, threads in [(1, t) for t in sorted({1, default_threads})] + [(32, default_threads)]:
            x = torch.randn(batch, n_in)
            torch.testing.assert_close(quantized(x), layer(x), rtol=1e-3, atol=1e-3)
            torch.set_num_threads(threads)
            t = timed({"dense": lambda x=x: layer(x), "fp32_csr": lambda x=x: fp32(x),
                       "quantized": lambda x=x: quantized(x)}, rounds)
            rows.append({"case": label, "shape": f"{n_in}->{n_out}", "density": round(density, 4), "bits": bits,
                         "batch": batch, "threads": threads, "ms": {k: v["min"] for k, v in t.items()},
                         "median_ms": {k: v["median"] for k, v in t.items()},
                         "bytes": {"dense": layer.weight.numel() * 4, "fp32_csr": fp32.cols.nbytes + fp32.vals.nbytes
                                   + fp32.product.tiles.nbytes, "quantized": quantized.product.nbytes}})
    torch.set_num_threads(default_threads)
    return rows


def quantized_table(rows: list[dict]) -> str:
    lines = ["| case | shape | density | bits | batch | threads | dense ms | fp32 CSR ms | quantized ms | "
             "quantized vs dense (min) | quantized vs fp32 CSR (min / median) | fp32 CSR MB | quantized MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, med, b = r["ms"], r["median_ms"], r["bytes"]
        lines.append(f"| {r['case']} | {r['shape']} | {r['density']:.2f} | {r['bits']} | {r.get('batch', 1)} | "
                     f"{r['threads']} | {ms['dense']:.3f} | {ms['fp32_csr']:.3f} | {ms['quantized']:.3f} | "
                     f"{ms['dense'] / ms['quantized']:.2f}x | "
                     f"{ms['fp32_csr'] / ms['quantized']:.2f}x / {med['fp32_csr'] / med['quantized']:.2f}x | "
                     f"{b['fp32_csr'] / 1e6:.1f} | {b['quantized'] / 1e6:.1f} |")
    return "\n".join(lines)


def main_quantized(args: argparse.Namespace) -> None:
    rounds = 10 if args.quick else 60
    info = machine()
    rows = []
    for label, n_in, n_out, density in (("AlexNet fc6", 9216, 4096, 0.09), ("VGG-16 fc6", 25088, 4096, 0.04)):
        rows += bench_quantized(label, n_in, n_out, density, 5, rounds)
        print(quantized_table(rows[-3:]), flush=True)
    info["load_average_end"] = os.getloadavg()
    text = quantized_table(rows)
    print(f"\n{text}\n\nload average start {info['load_average_start']}, end {info['load_average_end']}")
    cmd = "python benchmarks/inference.py --quantized" + (" --quick" if args.quick else "")
    write_results(args, info, "inference_quantized", rounds, rows,
                  f"# Inference from shared weights\n\n`{cmd}` — best (and median) of {rounds} interleaved "
                  "rounds, ms. Same weights (pruned at random to the density, then shared at 5 bits) for all three.",
                  text)


def speedups(row: dict) -> dict[str, float]:
    return {k: row["ms"]["dense"] / v for k, v in row["ms"].items() if k != "dense"}


def table(rows: list[dict]) -> str:
    cols = ["torch_csr", "ours", "scipy", "sparsify"]
    head = f"| case | shape | density | batch | dense ms | {' | '.join(c + ' ms' for c in cols)} | " \
           f"{' | '.join(c + ' x' for c in cols)} |"
    lines = [head, "|" + "---|" * (4 + 1 + 2 * len(cols))]
    for r in rows:
        s = speedups(r)
        ms = " | ".join(f"{r['ms'][c]:.3f}" if c in r["ms"] else "" for c in cols)
        xs = " | ".join(f"{s[c]:.2f}" if c in s else "" for c in cols)
        density = "" if r["density"] is None else f"{r['density']:.3f}"
        lines.append(f"| {r['case']} | {r['shape']} | {density} | {r['batch']} | "
                     f"{r['ms']['dense']:.3f} | {ms} | {xs} |")
    return "\n".join(lines)


def machine() -> dict:
    return {**machine_info(), "scipy": scipy.__version__, "load_average_start": os.getloadavg()}


def write_results(args, info: dict, stem: str, rounds: int, rows: list[dict], heading: str, text: str) -> None:
    """``<stem>[_quick].json`` and ``.md`` into ``--out`` (default: results/<LLVM host CPU>/), with the machine."""
    out = args.out or RESULTS / info["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    stem += "_quick" if args.quick else ""
    write_atomic(out / f"{stem}.json",
                 json.dumps({"machine": info, "rounds": rounds, "rows": rows}, indent=1).encode())
    write_atomic(out / f"{stem}.md", (
        f"{heading}\n\nMachine: {describe(info)}; load average at the start / end: {info['load_average_start']} / "
        f"{info['load_average_end']}\n\n{text}\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed rounds instead of 10")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU name>)")
    parser.add_argument("--quantized", action="store_true", help="only the batch-1 shared-weight comparison")
    args = parser.parse_args()
    if args.quantized:
        main_quantized(args)
        return
    rounds = 3 if args.quick else 10
    info = machine()
    rows = []
    fc = [("AlexNet fc6", 9216, 4096, 0.09), ("AlexNet fc7", 4096, 4096, 0.09), ("VGG-16 fc6", 25088, 4096, 0.04)]
    for label, n_in, n_out, density in fc:
        layer = random_pruned_linear(n_in, n_out, density)
        for batch in (1, 32, 256):
            rows.append(bench_layer(label, layer, batch, rounds))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        del layer
    for name, shape in (("lenet-300-100", (784,)), ("lenet-5", (1, 28, 28))):
        for batch in (1, 32, 256):
            for row in bench_model(name, shape, batch, rounds):
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
    info["load_average_end"] = os.getloadavg()
    text = table(rows)
    print()
    print(text)
    print(f"\nload average start {info['load_average_start']}, end {info['load_average_end']}")
    cmd = "python benchmarks/inference.py" + (" --quick" if args.quick else "")
    write_results(args, info, "inference", rounds, rows,
                  f"# Sparse inference benchmark\n\n`{cmd}` — best of {rounds} interleaved rounds, ms; `x` columns "
                  "are dense time / that time (higher is better).", text)


if __name__ == "__main__":
    main()
