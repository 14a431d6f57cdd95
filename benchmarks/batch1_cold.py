"""Where a batch-1 sparse call's time goes when the cache is cold: AlexNet fc6 (9216->4096 at 9% kept) called
through ``SparseLinear`` against its bare compiled plan and dense torch, with 256 MB copied before every call (the
layer and the Python and torch code paths are then read from memory, as after a model's other layers); the cold
cost of single Python/torch calls (the ones a module's forward makes); and the product's arrays on 4 KiB pages
against transparent huge pages. ``SparseLinear``'s general path (``_forward``: input checks, the bias copied into
a numpy output, ``torch.from_numpy``) is what every batch-1 call took until 2026-12-07; its one-example path makes
the fewest calls before the kernel, which writes bias + W x into ``torch.empty``.

    python benchmarks/batch1_cold.py [--rounds 30] [--quick] [--out DIR]

Each case is timed in interleaved rounds (one cold call of each per round); min and median ms. Writes
benchmarks/results/<LLVM host CPU>/batch1_cold[_quick].{json,md} with the machine (magprune.environment).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import magprune
from magprune.deploy import SparseLinear
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic
from magprune.kernels import memory

RESULTS = Path(__file__).resolve().parent / "results"


def cold_times(fns: dict, rounds: int, evict) -> dict[str, dict[str, float]]:
    """min and median ms of each fn over ``rounds`` interleaved rounds, ``evict()`` before every call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            evict()
            start = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {k: {"min": min(v), "median": statistics.median(v)} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results (default: "
                        "benchmarks/results/<LLVM host CPU>)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 5
    stem = "batch1_cold_quick" if args.quick else "batch1_cold"
    info = machine_info()
    torch.manual_seed(0)
    layer = nn.Linear(9216, 4096)
    magprune.Pruner(layer, ["weight"]).prune(magprune.LayerSparsity({"weight": 0.91}))
    layer.eval()
    x = torch.randn(1, 9216)
    small_pages = memory.HUGE_PAGE_MIN_BYTES
    memory.HUGE_PAGE_MIN_BYTES = 1 << 62  # nothing large enough: 4 KiB pages
    on_small = SparseLinear(layer)
    memory.HUGE_PAGE_MIN_BYTES = small_pages
    ours = SparseLinear(layer)
    big = torch.ones(256 << 20, dtype=torch.uint8)
    sink = torch.empty_like(big)

    def evict() -> None:
        sink.copy_(big)

    out = np.empty(4096, np.float32)
    rows = {}
    with torch.inference_mode():
        ours(x), on_small(x)  # the first call sets up the one-example path and the plan
        plan, small_plan = ours.product.matvec_plan(torch.get_num_threads()), \
            on_small.product.matvec_plan(torch.get_num_threads())
        bias = ours.bias.data_ptr()
        calls = {"dense nn.Linear": lambda: layer(x), "SparseLinear": lambda: ours(x),
                 "SparseLinear's general path (batch 1 until 2026-12-07)": lambda: ours._forward(x),
                 "bare plan (huge pages)": lambda: plan.run(x.data_ptr(), out.ctypes.data, bias),
                 "bare plan (4 KiB pages)": lambda: small_plan.run(x.data_ptr(), out.ctypes.data, bias)}
        rows["calls"] = cold_times(calls, args.rounds, evict)
        b = torch.randn(4096)
        singles = {"(a Python call)": lambda: None, "torch.empty(4096)": lambda: torch.empty(4096),
                   "np.empty(4096)": lambda: np.empty(4096, np.float32),
                   "torch.from_numpy(np.empty(4096))": lambda: torch.from_numpy(np.empty(4096, np.float32)),
                   "tensor.numpy()": lambda: b.numpy(), "tensor.clone()": lambda: b.clone(),
                   "x.requires_grad": lambda: x.requires_grad, "x.dtype": lambda: x.dtype,
                   "x.device": lambda: x.device, "x.shape": lambda: x.shape, "x.is_contiguous()": x.is_contiguous,
                   "x.data_ptr()": x.data_ptr, "torch.get_num_threads()": torch.get_num_threads}
        rows["single calls"] = cold_times(singles, args.rounds, evict)
    dense = rows["calls"]["dense nn.Linear"]["min"]
    lines = ["| call (cold) | min ms | median ms | dense min / min |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['min']:.3f} | {v['median']:.3f} | {dense / v['min']:.2f}x |"
              for k, v in rows["calls"].items()]
    lines += ["", "| single call (cold) | min us | median us |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {v['min'] * 1e3:.1f} | {v['median'] * 1e3:.1f} |" for k, v in rows["single calls"].items()]
    text = "\n".join(lines)
    print(text)
    out_dir = args.out or RESULTS / info["llvm_host_cpu"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / f"{stem}.json",
                 json.dumps({"machine": info, "rounds": args.rounds, "rows": rows}, indent=1).encode())
    write_atomic(out_dir / f"{stem}.md", (
        f"# Batch 1, cold: AlexNet fc6 (9216->4096, 9% kept)\n\n`python benchmarks/batch1_cold.py "
        f"{'--quick' if args.quick else f'--rounds {args.rounds}'}` — 256 MB copied before every call; min and "
        f"median of {args.rounds} interleaved rounds.\n\n"
        f"Machine: {describe(info)}\n\n{text}\n").encode())


if __name__ == "__main__":
    main()
