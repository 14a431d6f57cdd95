"""Whole training steps of a GPT-2-width model (transformers' GPT2LMHeadModel, random weights, no download) at 90%
pruned, masked-dense (the Pruner's default) against sparse compute, side by side in one run.

    python benchmarks/gpt2_step.py                       # n_embd 768, 2 blocks, 4 x 128 tokens, Adam
    python benchmarks/gpt2_step.py --rounds 20 --threads 1

A step is zero_grad, forward with the language-model loss, backward, Adam step. Every block's Conv1D layers (attention
in/out projections, MLP) are pruned to 10% kept (LayerSparsity 0.9) and, in the sparse run, computed sparse; the
token embedding (tied to the head) stays dense. Dropout is off, so both models take the same steps. The two models
run in alternating order each round; ratio = the sparse step's median / the masked step's median. Writes
results/<LLVM host CPU>/gpt2_step[_<N>thread].{json,md} (or --out) with the machine (magprune.environment).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import magprune
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"  # one folder per CPU: results/<LLVM host CPU name>/
MODES = ("masked", "sparse")


def build(args: argparse.Namespace):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.tokens, n_embd=args.width,
                                     n_layer=args.blocks, n_head=args.width // 64, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(config)
    runs = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        pruner = magprune.Pruner(model)  # the default targets: every block's Conv1D, not the tied embedding
        pruner.prune(magprune.LayerSparsity(0.9))
        handle = magprune.sparse_compute(model, pruner) if mode == "sparse" else None
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        pruner.attach(optimizer)
        runs[mode] = (model, optimizer, handle)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, one step of each model (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--width", type=int, default=768, help="n_embd (default 768, GPT-2 small's)")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary (default 1000: the head stays small)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the results (default results/<cpu>/)")
    args = parser.parse_args()
    for name in ("rounds", "width", "blocks", "batch", "tokens", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width % 64:
        parser.error(f"--width must be a multiple of 64 (heads of 64), got {args.width}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = {**machine_info(), "load_average_start": os.getloadavg()}
    runs = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))

    def step(mode: str) -> float:
        model, optimizer, _ = runs[mode]
        start = time.perf_counter()
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        return (time.perf_counter() - start) * 1e3

    for mode in MODES:  # warm-up: kernels compiled, plans made, optimizer state created
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            times[mode].append(step(mode))
    info["load_average_end"] = os.getloadavg()
    sparse_layers = runs["sparse"][2].names
    losses = {}
    with torch.no_grad():
        for mode in MODES:
            runs[mode][0].eval()
            losses[mode] = float(runs[mode][0](input_ids=ids, labels=ids).loss)
    medians = {mode: statistics.median(v) for mode, v in times.items()}
    ratio = medians["sparse"] / medians["masked"]
    flags = "".join(f" --{k} {getattr(args, k)}" for k, d in
                    (("rounds", 10), ("threads", None), ("width", 768), ("blocks", 2), ("batch", 4), ("tokens", 128),
                     ("vocab", 1000)) if getattr(args, k) != d)
    cmd = f"python benchmarks/gpt2_step.py{flags}"
    text = (f"| mode | step ms (median) | range | loss after {args.rounds + 1} steps |\n|---|---:|---|---:|\n"
            + "".join(f"| {mode} | {medians[mode]:.1f} | {min(times[mode]):.1f}-{max(times[mode]):.1f} | "
                      f"{losses[mode]:.5f} |\n" for mode in MODES)
            + f"\nSparse / masked: **{ratio:.2f}** (medians of {args.rounds} rounds); {len(sparse_layers)} layers "
              "computed sparse.")
    print(f"{text}\n\n{describe(info)}")
    out = args.out or RESULTS / info["llvm_host_cpu"]
    stem = "gpt2_step" if args.threads is None else f"gpt2_step_{args.threads}thread"
    write_atomic(out / f"{stem}.json", json.dumps({"machine": info, "command": cmd, "times_ms": times,
                                                     "median_ms": medians, "ratio": ratio, "losses": losses,
                                                     "sparse_layers": sparse_layers}, indent=1).encode())
    write_atomic(out / f"{stem}.md", (
        f"# GPT-2-width training steps at 90% pruned: masked-dense against sparse compute\n\n`{cmd}` — "
        f"n_embd {args.width}, {args.blocks} blocks, {args.batch} x {args.tokens} tokens, vocabulary {args.vocab}, "
        f"Adam; the two models in alternating order each round.\n\nMachine: {describe(info)}\n\n{json.dumps(info)}"
        f"\n\n{text}\n").encode())


if __name__ == "__main__":
    main()
