"""Benchmark: bytes of each entropy coder on the two symbol streams (relative indices, codebook indices) of every
shared layer of compressed files, next to the Shannon entropy of each stream.

    python benchmarks/coders.py FILE [FILE ...] [--out DIR]

FILE: compressed-format files with shared weights (``magprune export RUN_DIR --format quantized`` or a run's
``model.quantized.safetensors``). Writes DIR/coders.{json,md} (default benchmarks/results/<LLVM host CPU>/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from magprune.deploy.entropy import CODERS, SharedWeight, encode_stream, relative_gaps
from magprune.deploy.format import load_compressed
from magprune.environment import describe, machine_info
from magprune.fileio import write_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def entropy_bytes(symbols: np.ndarray) -> float:
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def rows_for(path: Path) -> list[dict]:
    import zlib

    from safetensors.numpy import load_file

    arrays = load_file(str(path))
    params = json.loads(zlib.decompress(arrays["__params__"].tobytes()))
    rows = []
    for name, value in load_compressed(path, expand_shared=False).items():
        if not isinstance(value, SharedWeight):
            continue
        bits = params[name]["shared"]["index_bits"]
        streams = {"gaps": (relative_gaps(value.positions, bits), 1 << bits),
                   "indices": (value.indices, max(value.codebook.size, 1))}
        for stream, (symbols, alphabet) in streams.items():
            sizes = {c: len(encode_stream(symbols, alphabet, (c,))) for c in CODERS}
            rows.append({"file": f"{path.parent.name}/{path.name}", "tensor": name, "stream": stream,
                         "symbols": int(symbols.size), "alphabet": alphabet,
                         "entropy_bytes": round(entropy_bytes(symbols), 1), "bytes": sizes})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"| file | tensor | stream | symbols | entropy bytes | {' | '.join(CODERS)} | best |",
             "|---|---|---|---:|---:|" + "---:|" * len(CODERS) + "---|"]
    for r in rows:
        best = min(r["bytes"], key=r["bytes"].get)
        lines.append(f"| {r['file']} | {r['tensor']} | {r['stream']} | {r['symbols']:,} | {r['entropy_bytes']:,.0f} | "
                     + " | ".join(f"{r['bytes'][c]:,}" for c in CODERS) + f" | {best} |")
    totals = {c: sum(r["bytes"][c] for r in rows) for c in CODERS}
    best_total = sum(min(r["bytes"].values()) for r in rows)
    lines.append(f"| total | | | | {sum(r['entropy_bytes'] for r in rows):,.0f} | "
                 + " | ".join(f"{totals[c]:,}" for c in CODERS) + f" | {best_total:,} (per stream) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [row for path in args.files for row in rows_for(path)]
    text = table(rows)
    print(text)
    info = machine_info()
    out = args.out or RESULTS / info["llvm_host_cpu"]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "coders.json", json.dumps({"machine": info, "rows": rows}, indent=1).encode())
    write_atomic(out / "coders.md", (
        f"# Entropy coders on shared-weight streams\n\n`python benchmarks/coders.py "
        f"{' '.join(str(f) for f in args.files)}` — bytes per stream (coder byte and Huffman tables included); "
        f"entropy = Shannon bound of an order-0 model.\n\nMachine: {describe(info)}\n\n{text}\n").encode())


if __name__ == "__main__":
    main()
