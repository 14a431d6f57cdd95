"""Kernels room (transpose): float32 matrix transposes in 8x8 register tiles, run as plans on :mod:`.pool`.

The batched products want the batch as the fast dimension (``y^T = W x^T``), so a layer's input is transposed on
the way in and its output on the way out. torch's strided copy did that at ~4 GB/s (a (256, 9216) input in 2.2 ms,
the (4096, 256) output in 1.2-1.6 ms through numpy on this project's Intel Xeon: 14% of a 9216x4096 layer's batch-256
product at 9%); eight rows loaded as vectors, transposed by shuffles and stored as eight columns run at memory speed
on the pool's threads.

One kernel, ``transpose8``: ``dst[j, i] = src[i, j]`` for the 8x8-aligned part of a (rows, cols) block, the outer loop
over 8 columns of ``src`` (8 rows of ``dst``, written whole) and the inner over its rows. Ragged edges (rows or
columns past a multiple of 8) are copied by numpy, a few rows at most.
"""

from __future__ import annotations

import itertools

import numpy as np

from magprune.kernels.jit import compiled
from magprune.kernels.pool import CHUNKS_PER_THREAD, SPMM, Plan

PARALLEL_MIN_FLOATS = 1 << 15  # smaller transposes run on the calling thread (waking a worker costs ~50 us); a
# LeNet-300-100 data batch (64 x 784, 50K floats) runs on both threads of torch's team (see csr.PARALLEL_MIN_WORK)
_plans: dict[tuple, Plan] = {}


def _shuffle(name: str, a: str, b: str, mask: list[int]) -> str:
    return (f"  {name} = shufflevector <8 x float> {a}, <8 x float> {b}, "
            f"<8 x i32> <{', '.join(f'i32 {m}' for m in mask)}>")


def _transpose_ir() -> str:
    """IR of ``transpose8(rows, cols, lds, ldd, src, _, dst, _ x 7)`` (the pool's SPMM calling convention: src and
    dst addresses are arguments 4 and 6, the call's bases added in)."""
    params = ", ".join(["i64 %rows", "i64 %cols", "i64 %lds", "i64 %ldd", "i64 %srci", "i64 %unused5", "i64 %dsti"]
                       + [f"i64 %unused{j}" for j in range(7, 14)])
    lines = [f"define void @transpose8({params}) nounwind {{", "entry:",
             "  %src = inttoptr i64 %srci to ptr", "  %dst = inttoptr i64 %dsti to ptr",
             "  %r8 = and i64 %rows, -8", "  %c8 = and i64 %cols, -8", "  %anyr = icmp ugt i64 %r8, 0",
             "  %anyc = icmp ugt i64 %c8, 0", "  %any = and i1 %anyr, %anyc", "  br i1 %any, label %col, label %exit",
             "col:", "  %j = phi i64 [0, %entry], [%j.next, %colend]", "  br label %row",
             "row:", "  %i = phi i64 [0, %col], [%i.next, %row]"]
    for r in range(8):
        lines += [f"  %ir{r} = add i64 %i, {r}", f"  %so{r} = mul i64 %ir{r}, %lds", f"  %sj{r} = add i64 %so{r}, %j",
                  f"  %sp{r} = getelementptr float, ptr %src, i64 %sj{r}",
                  f"  %v{r} = load <8 x float>, ptr %sp{r}, align 4"]
    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    for p in range(4):  # interleave row pairs
        lines += [_shuffle(f"%t{2 * p}", f"%v{2 * p}", f"%v{2 * p + 1}", lo),
                  _shuffle(f"%t{2 * p + 1}", f"%v{2 * p}", f"%v{2 * p + 1}", hi)]
    pair_lo, pair_hi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    for q, (a, b) in enumerate([(0, 2), (4, 6)]):  # then pairs of pairs: four rows' lanes 0/4, 1/5, 2/6, 3/7
        lines += [_shuffle(f"%u{4 * q}", f"%t{a}", f"%t{b}", pair_lo),
                  _shuffle(f"%u{4 * q + 1}", f"%t{a}", f"%t{b}", pair_hi),
                  _shuffle(f"%u{4 * q + 2}", f"%t{a + 1}", f"%t{b + 1}", pair_lo),
                  _shuffle(f"%u{4 * q + 3}", f"%t{a + 1}", f"%t{b + 1}", pair_hi)]
    for c in range(4):  # halves of rows 0-3 and 4-7: column c (low 128 bits) and c + 4 (high)
        lines += [_shuffle(f"%w{c}", f"%u{c}", f"%u{c + 4}", [0, 1, 2, 3, 8, 9, 10, 11]),
                  _shuffle(f"%w{c + 4}", f"%u{c}", f"%u{c + 4}", [4, 5, 6, 7, 12, 13, 14, 15])]
    for c in range(8):
        lines += [f"  %jc{c} = add i64 %j, {c}", f"  %do{c} = mul i64 %jc{c}, %ldd", f"  %di{c} = add i64 %do{c}, %i",
                  f"  %dp{c} = getelementptr float, ptr %dst, i64 %di{c}",
                  f"  store <8 x float> %w{c}, ptr %dp{c}, align 4"]
    lines += ["  %i.next = add i64 %i, 8", "  %rows.left = icmp ult i64 %i.next, %r8",
              "  br i1 %rows.left, label %row, label %colend",
              "colend:", "  %j.next = add i64 %j, 8", "  %cols.left = icmp ult i64 %j.next, %c8",
              "  br i1 %cols.left, label %col, label %exit", "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _kernel() -> int:
    return compiled("transpose", _transpose_ir, lambda engine: engine.get_function_address("transpose8"))


def _check(src: np.ndarray, dst: np.ndarray) -> None:
    if src.ndim != 3 or dst.ndim != 3 or src.dtype != np.float32 or dst.dtype != np.float32:
        raise ValueError(f"transpose wants 3-D float32 arrays, got {src.dtype} {src.shape} and {dst.dtype} {dst.shape}")
    b, r, c = src.shape
    if dst.shape != (b, c, r):
        raise ValueError(f"transpose: dst must have shape {(b, c, r)} for src {src.shape}, got {dst.shape}")
    for name, a in (("src", src), ("dst", dst)):
        if a.strides[2] != 4 or a.strides[1] % 4 or a.strides[0] % 4 or min(a.strides) < 0:
            raise ValueError(f"transpose: {name} must have unit-stride rows, got strides {a.strides}")
    if not dst.flags.writeable:
        raise ValueError("transpose: dst is read-only")


def transpose_plan(batches: int, rows: int, cols: int, src_strides: tuple[int, int], dst_strides: tuple[int, int],
                   threads: int) -> Plan:
    """The cached plan transposing the 8x8-aligned part (rows and cols rounded down to multiples of 8, both > 0) of
    ``batches`` float32 (rows, cols) blocks into (cols, rows) ones, strides in bytes (block, row) of the source and
    the destination, rows contiguous: ``plan.run(src_address, dst_address)`` (the caller vouches for the memory;
    sparse compute runs it on a layer's input with no numpy view or check in the step)."""
    r8, c8 = rows & ~7, cols & ~7
    threads = threads if batches * r8 * c8 >= PARALLEL_MIN_FLOATS else 1
    key = (batches, r8, c8, src_strides, dst_strides, threads)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 64:
            _plans.clear()
        fn = _kernel()
        lds, ldd = src_strides[1] // 4, dst_strides[1] // 4
        parts = max(threads * CHUNKS_PER_THREAD // batches, 1) if threads > 1 else 1
        cuts = sorted({8 * round(c8 / 8 * i / parts) for i in range(parts + 1)})
        per_task = [[[SPMM, fn, r8, b - a, lds, ldd, blk * src_strides[0] + 4 * a, 0,
                      blk * dst_strides[0] + a * dst_strides[1]] + [0] * 7]
                    for blk in range(batches) for a, b in itertools.pairwise(cuts)]
        plan = _plans[key] = Plan(per_task, threads)
    return plan


def transpose(src: np.ndarray, dst: np.ndarray, threads: int = 1) -> np.ndarray:
    """``dst[b] = src[b].T`` for float32 src (B, R, C) and dst (B, C, R) whose rows are contiguous (any row and
    block strides, e.g. views into padded arrays); the 8x8-aligned part on up to ``threads`` threads. Returns dst.
    The two arrays must not overlap."""
    _check(src, dst)
    batches, rows, cols = src.shape
    if batches == 0 or rows == 0 or cols == 0:
        return dst
    r8, c8 = rows & ~7, cols & ~7
    if r8 and c8:
        transpose_plan(batches, rows, cols, src.strides[:2], dst.strides[:2], threads).run(src.ctypes.data,
                                                                                              dst.ctypes.data)
    if c8 < cols:
        dst[:, c8:, :] = src[:, :, c8:].transpose(0, 2, 1)
    if r8 < rows:
        dst[:, :c8, r8:] = src[:, r8:, :c8].transpose(0, 2, 1)
    return dst
