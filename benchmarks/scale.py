"""Time and peak extra memory of pruning a VGG-16-size model: magprune vs torch.nn.utils.prune.

Each case runs in a fresh subprocess: build the model (random init), reset the peak-RSS counter
(/proc/self/clear_refs), prune, read the peak (VmHWM). "Extra memory" is that peak minus the RSS before pruning,
divided by the model's size in fp32 bytes. Cases:

- magprune, Han et al.'s per-layer densities (``han2015("vgg-16")``)
- magprune, global magnitude sparsity 92.5% (``GlobalSparsity``)
- torch.nn.utils.prune.l1_unstructured per layer at Han's densities
- torch.nn.utils.prune.global_unstructured (L1) at 92.5%
- training steps (SGD momentum, batch 1): dense, and pruned (global 92.5%) with magprune, whose large layers are
  masked from 1-bit copies of their masks, and again with fp32 mask copies in every layer (the way of small layers);
  there "extra memory" is the peak over the RSS after one dense step (weights, gradients and momentum allocated),
  "mask copies" the bytes of the copies the pruner keeps for training, and the time that of one step after a
  first, untimed one (which compiles the kernels)
- with ``--fsdp``: the model sharded over 2 gloo processes by FSDP2 (``fully_shard`` per layer and at the root),
  pruned by ``han2015("vgg-16")`` and ``GlobalSparsity``, and a training step (SGD momentum, batch 1 per rank)
  after a global prune; each rank measures its own peak over its own RSS (taken after sharding, and for the
  training case after a dense step), beside the single-process magprune cases, interleaved

    python benchmarks/scale.py            # VGG-16 ImageNet (138M weights; ~10 GB peak for the torch global case)
    python benchmarks/scale.py --quick    # VGG-16 CIFAR-size (15M weights)
    python benchmarks/scale.py --fsdp [--quick]   # sharded over 2 ranks: per-rank memory

Writes benchmarks/results/<LLVM host CPU>/scale.json and scale.md (``--fsdp``: scale-fsdp.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/
GLOBAL_SPARSITY = 0.925  # Han's VGG-16 total: 7.5% of weights kept
CASES = ["magprune-han2015", "magprune-global", "torch-l1-per-layer", "torch-global-l1"]
TRAIN_CASES = ["train-dense", "train-magprune", "train-magprune-fp32-masks"]
TRAIN_STEPS = 2
FSDP_CASES = ["fsdp2-han2015", "fsdp2-global", "fsdp2-train-dense", "fsdp2-train"]
FSDP_WORLD = 2


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_train_case(case: str, model_name: str) -> dict:
    """A training-step case, inside the child process."""
    import torch
    from torch.nn import functional as F

    import magprune
    from magprune import pruner as pruner_module

    torch.manual_seed(0)
    model = magprune.create_model(model_name)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    side = 224 if model_name == "vgg-16" else 32
    x, y = torch.randn(1, 3, side, side), torch.tensor([0])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # dense: gradients and momentum exist from here on
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    density = 1.0
    if case != "train-dense":
        if case == "train-magprune-fp32-masks":
            pruner_module.PACKED_MIN_NUMEL = 1 << 62
        pruner = magprune.Pruner(model)
        pruner.attach(optimizer)
        pruner.prune(magprune.GlobalSparsity(GLOBAL_SPARSITY))
        density = 1 - pruner.sparsity()
    step()
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    seconds = (time.perf_counter() - start) / TRAIN_STEPS
    peak = _rss_kb("VmHWM")
    copies = 0
    if case != "train-dense":
        pruner.check()
        copies = pruner.mask_copy_bytes
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return {"case": case, "model": model_name, "weights": weights, "model_bytes": model_bytes,
            "seconds": seconds, "extra_bytes": (peak - before) * 1024,
            "extra_over_model": (peak - before) * 1024 / model_bytes, "density": density, "mask_copy_bytes": copies}


def _fsdp_rank(rank: int, case: str, model_name: str, port: int, out: str) -> None:
    """One rank of a sharded case (spawned by run_fsdp_case): shard, prune (and train), measure this rank's peak."""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn import functional as F

    import magprune
    from magprune import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", rank=rank, world_size=FSDP_WORLD)
    torch.manual_seed(0)
    model = magprune.create_model(model_name)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(module)
    fully_shard(model)
    gc.collect()
    local_param_bytes = sum(sharding.local(p.detach()).nbytes for p in model.parameters())
    side = 224 if model_name == "vgg-16" else 32
    generator = torch.Generator().manual_seed(rank)
    x, y = torch.randn(1, 3, side, side, generator=generator), torch.tensor([rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    training = case.startswith("fsdp2-train")
    if training:
        step()  # dense: sharded gradients and momentum exist from here on
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    pruner = magprune.Pruner(model)
    if case == "fsdp2-han2015":
        pruner.prune(magprune.han2015("vgg-16"))
    elif case != "fsdp2-train-dense":
        pruner.attach(optimizer)
        pruner.prune(magprune.GlobalSparsity(GLOBAL_SPARSITY))
    seconds = time.perf_counter() - start
    if training:
        step()
        start = time.perf_counter()
        for _ in range(TRAIN_STEPS):
            step()
        seconds = (time.perf_counter() - start) / TRAIN_STEPS
    peak = _rss_kb("VmHWM")
    pruner.check()
    density = 1 - pruner.sparsity()
    local_mask_bytes = sum(sharding.local(p.detach()).numel() for p in pruner.params.values())  # bool: 1 byte
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "seconds": seconds, "extra_bytes": (peak - before) * 1024, "density": density,
        "local_param_bytes": local_param_bytes, "local_mask_bytes": local_mask_bytes,
        "mask_copy_bytes": pruner.mask_copy_bytes}))
    dist.barrier()  # every rank done before any tears gloo down (see magprune/cli.py)
    dist.destroy_process_group()


def run_fsdp_case(case: str, model_name: str) -> dict:
    """A sharded case, inside the child process: 2 ranks, one row with every rank's figures and the worst rank's."""
    import socket
    import tempfile

    import torch
    import torch.multiprocessing as mp

    import magprune

    model = magprune.create_model(model_name)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    del model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_fsdp_rank, args=(case, model_name, port, out), nprocs=FSDP_WORLD)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(FSDP_WORLD)]
    worst = max(ranks, key=lambda r: r["extra_bytes"])
    return {"case": case, "model": model_name, "weights": weights, "model_bytes": model_bytes,
            "seconds": max(r["seconds"] for r in ranks), "extra_bytes": worst["extra_bytes"],
            "extra_over_model": worst["extra_bytes"] / model_bytes, "density": ranks[0]["density"],
            "mask_copy_bytes": worst["mask_copy_bytes"], "ranks": ranks}


def run_case(case: str, model_name: str) -> dict:
    """Runs inside the child process."""
    if case in TRAIN_CASES:
        return run_train_case(case, model_name)
    if case in FSDP_CASES:
        return run_fsdp_case(case, model_name)
    import torch
    from torch.nn.utils import prune as torch_prune

    import magprune
    from magprune.criteria import HAN2015_DENSITIES

    torch.manual_seed(0)
    model = magprune.create_model(model_name)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    densities = HAN2015_DENSITIES["vgg-16"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    start = time.perf_counter()
    if case == "magprune-han2015":
        pruner = magprune.Pruner(model)
        pruner.prune(magprune.han2015("vgg-16"))
        kept = 1 - pruner.sparsity()
    elif case == "magprune-global":
        pruner = magprune.Pruner(model)
        pruner.prune(magprune.GlobalSparsity(GLOBAL_SPARSITY))
        kept = 1 - pruner.sparsity()
    elif case == "torch-l1-per-layer":
        for layer, density in densities.items():
            torch_prune.l1_unstructured(model.get_submodule(layer), "weight", amount=1 - density)
        kept = sum(int(model.get_submodule(n).weight_mask.sum()) for n in densities) / weights
    elif case == "torch-global-l1":
        params = [(model.get_submodule(n), "weight") for n in densities]
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=GLOBAL_SPARSITY)
        kept = sum(int(model.get_submodule(n).weight_mask.sum()) for n in densities) / weights
    else:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    seconds = time.perf_counter() - start
    peak = _rss_kb("VmHWM")
    return {"case": case, "model": model_name, "weights": weights, "model_bytes": model_bytes,
            "seconds": seconds, "extra_bytes": (peak - before) * 1024,
            "extra_over_model": (peak - before) * 1024 / model_bytes, "density": kept}


def machine() -> dict:
    from magprune.environment import machine_info

    return machine_info()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CIFAR-size VGG-16 instead of ImageNet's")
    parser.add_argument("--fsdp", action="store_true",
                        help="the model sharded over 2 ranks by FSDP2 (per-rank memory), beside one process")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON and Markdown results (default: results/<LLVM host CPU name>)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:  # child process
        print(json.dumps(run_case(args.case, args.model)))
        return {}
    model_name = "vgg-16-cifar" if args.quick else "vgg-16"
    rows = []
    cases = ["magprune-han2015", "fsdp2-han2015", "magprune-global", "fsdp2-global", "train-dense",
             "fsdp2-train-dense", "train-magprune", "fsdp2-train"] if args.fsdp else CASES + TRAIN_CASES
    for case in cases:
        child = subprocess.run([sys.executable, __file__, "--case", case, "--model", model_name],
                               capture_output=True, text=True, timeout=1800)
        if child.returncode:
            rows.append({"case": case, "model": model_name, "error": child.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{case:20s} " + (f"{row['seconds']:7.2f} s  extra memory {row['extra_over_model']:.3f}x model  "
                                f"density {row['density']:.4f}" if "error" not in row else f"failed: {row['error']}"),
              flush=True)
    by_case = {r["case"]: r for r in rows if "error" not in r}
    ratios = {}
    for ours, theirs in (("magprune-han2015", "torch-l1-per-layer"), ("magprune-global", "torch-global-l1"),
                         ("train-magprune", "train-magprune-fp32-masks"), ("train-dense", "train-magprune"),
                         ("fsdp2-han2015", "magprune-han2015"), ("fsdp2-global", "magprune-global"),
                         ("fsdp2-train-dense", "train-dense"), ("fsdp2-train", "train-magprune"),
                         ("fsdp2-train-dense", "fsdp2-train")):
        if ours in by_case and theirs in by_case:
            ratios[f"{theirs} / {ours}"] = {
                "time": by_case[theirs]["seconds"] / by_case[ours]["seconds"],
                "extra_memory": by_case[theirs]["extra_bytes"] / max(by_case[ours]["extra_bytes"], 1)}
    result = {"command": "python benchmarks/scale.py" + (" --fsdp" if args.fsdp else "")
              + (" --quick" if args.quick else ""), "machine": machine(),
              "rows": rows, "ratios": ratios}
    from magprune.fileio import write_atomic

    markdown = to_markdown(result)
    out = args.out or RESULTS / result["machine"]["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    suffix = ("-fsdp" if args.fsdp else "") + ("-quick" if args.quick else "")
    write_atomic(out / f"scale{suffix}.json", json.dumps(result, indent=2).encode())
    write_atomic(out / f"scale{suffix}.md", markdown.encode())
    print()
    print(markdown)
    return result


def to_markdown(result: dict) -> str:
    from magprune.environment import describe

    m = result["machine"]
    lines = ["# Pruning at VGG-16 scale: time and peak extra memory", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {describe(m)}; load average at the start: {m['load_average']}", "",
             "| case | model | weights | time (s) | peak extra memory | x model size | density | mask copies |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['model']} | | failed: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['model']} | {r['weights']:,} | {r['seconds']:.2f} | "
                     f"{r['extra_bytes'] / 2**20:,.0f} MiB | {r['extra_over_model']:.3f} | {r['density']:.4f} | "
                     + (f"{r['mask_copy_bytes'] / 2**20:,.1f} MiB |" if "mask_copy_bytes" in r else "|"))
    lines += ["", "Training rows: time is one step; extra memory is over the RSS after a dense step.", "",
              "| ratio (theirs / ours) | time | extra memory |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v['time']:.1f}x | {v['extra_memory']:.1f}x |" for k, v in result["ratios"].items()]
    sharded = [r for r in result["rows"] if "ranks" in r]
    if sharded:
        lines += ["", f"FSDP2 rows, per rank ({FSDP_WORLD} gloo processes, one thread each; the rows above give the "
                  "worst rank): its shard of the parameters, its local boolean masks, its peak extra memory.", "",
                  "| case | rank | local parameters | local masks | peak extra memory | x local masks | "
                  "x local parameters |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['case']} | {k['rank']} | {k['local_param_bytes'] / 2**20:,.1f} MiB | "
                  f"{k['local_mask_bytes'] / 2**20:,.1f} MiB | {k['extra_bytes'] / 2**20:,.1f} MiB | "
                  f"{k['extra_bytes'] / k['local_mask_bytes']:.2f} | {k['extra_bytes'] / k['local_param_bytes']:.3f} |"
                  for r in sharded for k in r["ranks"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
