"""Kernels room (sampled products): a dense x dense product evaluated only at the positions of a CSR pattern (SDDMM).

The weight gradient of a pruned Linear is needed only at its kept connections: for nonzero k at (row o, column i),
``out[k] = sum_b sum_c dy[b, o, c] * x[b, i, c]``, with x and dy in the blocked layout of :mod:`.csr`'s products
(B blocks of ``width`` batch columns, row-major: x (B, n_in, width), dy (B, n_rows, width)). Per nonzero: one
contiguous row of x and of dy per block, multiplied and added as ``<width x float>`` vectors (LLVM splits them into
the host's registers: two 16-lane zmm for a 32-column block on AVX-512, four ymm on AVX2), then one horizontal sum.

``sddmm_{W}_{index}`` runs the rows ``r0 <= r < r1`` for W in WIDTHS (the block widths of the products: the batch
rounded up to 8, at most 32) and column-index width uint8/16/32, as :data:`.pool.SDDMM` records.
"""

from __future__ import annotations

import numpy as np

from magprune.kernels.csr import row_splits
from magprune.kernels.jit import compiled
from magprune.kernels.pool import CHUNKS_PER_THREAD, SDDMM, Plan

WIDTHS = (8, 16, 24, 32)
_INDEX_TYPES = {np.dtype(np.uint8): "i8", np.dtype(np.uint16): "i16", np.dtype(np.uint32): "i32"}
PARALLEL_MIN_WORK = 1 << 22  # multiply-adds (nonzeros x batch columns) from which the rows are split over threads, as
# for the products (LeNet-300-100's fc1 at batch 64, 1.2M, is faster on the calling thread alone)


def _sddmm_ir(width: int, index: str) -> str:
    """IR of one kernel; two nonzeros per pass (two independent multiply-add chains and sums in flight)."""
    vec = f"<{width} x float>"
    lines = [f"define void @sddmm_{width}_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %gv, ptr noalias %x, i64 %ldx, ptr noalias %dy, i64 %ldd, i64 %r0, i64 %r1, "
             "i64 %blocks, i64 %xstep, i64 %dstep) nounwind {",
             "entry:", "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
             "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %row.end]",
             "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
             "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
             "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64",
             "  %doff = mul nuw i64 %o, %ldd", "  %drow = getelementptr float, ptr %dy, i64 %doff",
             "  br label %pair",
             "pair:", "  %k = phi i64 [%s, %row], [%k.next, %pair.end]", "  %k1 = add nuw i64 %k, 1",
             "  %k.next = add nuw i64 %k, 2", "  %two = icmp ule i64 %k.next, %e",
             "  br i1 %two, label %pair.body, label %single"]

    def column(tag: str, k: str) -> list[str]:
        return [f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 {k}", f"  %cn{tag} = load {index}, ptr %cp{tag}",
                f"  %c{tag} = zext {index} %cn{tag} to i64", f"  %xo{tag} = mul nuw i64 %c{tag}, %ldx",
                f"  %xrow{tag} = getelementptr float, ptr %x, i64 %xo{tag}"]

    def block_step(tag: str, acc: str, new: str, block: str) -> list[str]:
        return [f"  %xbo{tag} = mul nuw i64 {block}, %xstep", f"  %xp{tag} = getelementptr float, ptr %xrow{tag}, "
                f"i64 %xbo{tag}", f"  %xv{tag} = load {vec}, ptr %xp{tag}, align 4",
                f"  %m{tag} = fmul contract {vec} %dv{block[1:]}, %xv{tag}",
                f"  {new} = fadd contract {vec} {acc}, %m{tag}"]

    def dy_load(block: str) -> list[str]:
        name = block[1:]
        return [f"  %dbo{name} = mul nuw i64 {block}, %dstep",
                f"  %dp{name} = getelementptr float, ptr %drow, i64 %dbo{name}",
                f"  %dv{name} = load {vec}, ptr %dp{name}, align 4"]

    def store(tag: str, k: str, acc: str) -> list[str]:
        return [f"  %sum{tag} = call reassoc float @llvm.vector.reduce.fadd.v{width}f32(float 0.0, {vec} {acc})",
                f"  %gp{tag} = getelementptr float, ptr %gv, i64 {k}", f"  store float %sum{tag}, ptr %gp{tag}"]

    lines += ["pair.body:", *column("a", "%k"), *column("b", "%k1"), "  br label %pblock",
              "pblock:", "  %pb = phi i64 [0, %pair.body], [%pb.next, %pblock]",
              f"  %pacc.a = phi {vec} [zeroinitializer, %pair.body], [%pnew.a, %pblock]",
              f"  %pacc.b = phi {vec} [zeroinitializer, %pair.body], [%pnew.b, %pblock]",
              *dy_load("%pb"), *block_step("a", "%pacc.a", "%pnew.a", "%pb"),
              *block_step("b", "%pacc.b", "%pnew.b", "%pb"),
              "  %pb.next = add nuw i64 %pb, 1", "  %pmore = icmp ult i64 %pb.next, %blocks",
              "  br i1 %pmore, label %pblock, label %pair.store",
              "pair.store:", *store("a", "%k", "%pnew.a"), *store("b", "%k1", "%pnew.b"), "  br label %pair.end",
              "pair.end:", "  br label %pair",
              "single:", "  %one = icmp ult i64 %k, %e", "  br i1 %one, label %single.body, label %row.end",
              "single.body:", *column("t", "%k"), "  br label %sblock",
              "sblock:", "  %sb = phi i64 [0, %single.body], [%sb.next, %sblock]",
              f"  %sacc = phi {vec} [zeroinitializer, %single.body], [%snew, %sblock]",
              *dy_load("%sb"), *block_step("t", "%sacc", "%snew", "%sb"),
              "  %sb.next = add nuw i64 %sb, 1", "  %smore = icmp ult i64 %sb.next, %blocks",
              "  br i1 %smore, label %sblock, label %single.store",
              "single.store:", *store("t", "%k", "%snew"), "  br label %row.end",
              "row.end:", "  %o.next = add nuw i64 %o, 1", "  %rows.left = icmp ult i64 %o.next, %r1",
              "  br i1 %rows.left, label %row, label %exit", "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _module_ir() -> str:
    return "\n\n".join([f"declare float @llvm.vector.reduce.fadd.v{w}f32(float, <{w} x float>)" for w in WIDTHS]
                       + [_sddmm_ir(w, t) for w in WIDTHS for t in _INDEX_TYPES.values()])


def kernel(width: int, index_dtype: np.dtype) -> int:
    """Address of the compiled kernel for a block ``width`` (one of WIDTHS) and a column-index dtype."""
    found = compiled("sddmm", _module_ir, lambda engine: {
        (w, t): engine.get_function_address(f"sddmm_{w}_{t}") for w in WIDTHS for t in _INDEX_TYPES.values()})
    return found[width, _INDEX_TYPES[np.dtype(index_dtype)]]


class SampledProduct:
    """``out[k] = sum over blocks b and columns c of dy[b, row_k, c] * x[b, cols[k], c]`` for every nonzero k of a
    CSR pattern (int32 row pointers, uint8/16/32 column indices); rows split over the pool's threads by nonzeros.

    Plans are cached per call shape with the addresses of x and out left out (dy is found at a fixed offset from
    out, part of the cache key). Pickling and copying keep only the pattern."""

    def __init__(self, indptr: np.ndarray, cols: np.ndarray, n_in: int) -> None:
        if indptr.dtype != np.int32 or cols.dtype not in _INDEX_TYPES:
            raise ValueError(f"SampledProduct wants int32 row pointers and uint8/16/32 columns, got {indptr.dtype}, "
                             f"{cols.dtype}")
        self.indptr, self.cols, self.n_in = np.ascontiguousarray(indptr), np.ascontiguousarray(cols), n_in
        self._plans: dict[tuple, Plan] = {}

    def __getstate__(self) -> dict:
        return {"indptr": self.indptr, "cols": self.cols, "n_in": self.n_in}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plans = {}

    @property
    def n_rows(self) -> int:
        return self.indptr.shape[0] - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def run(self, x: np.ndarray, dy: np.ndarray, out: np.ndarray, threads: int) -> None:
        """Write the sampled products into ``out`` (nnz,) for x (B, n_in, w) and dy (B, n_rows, w), C-contiguous
        float32 with w in WIDTHS."""
        batches, n_in, width = x.shape
        if width not in WIDTHS or n_in != self.n_in or dy.shape != (batches, self.n_rows, width) \
                or out.shape != (self.nnz,) or not all(a.dtype == np.float32 and a.flags.c_contiguous
                                                       for a in (x, dy, out)):
            raise ValueError(f"SampledProduct.run wants C-contiguous float32 x (B, {self.n_in}, w), dy "
                             f"(B, {self.n_rows}, w) with w in {WIDTHS} and out ({self.nnz},), got {x.dtype} "
                             f"{x.shape}, {dy.dtype} {dy.shape}, {out.dtype} {out.shape}")
        if self.nnz == 0:
            return
        if batches == 0:
            out[:] = 0.0
            return
        threads = threads if self.nnz * batches * width >= PARALLEL_MIN_WORK else 1
        dy_offset = dy.ctypes.data - out.ctypes.data
        key = (threads, batches, width, dy_offset)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:
                self._plans.clear()
            fn = kernel(width, self.cols.dtype)
            starts, ends = self.indptr.ctypes.data, self.indptr.ctypes.data + 4
            ranges = row_splits(self.indptr, threads * CHUNKS_PER_THREAD) if threads > 1 else [(0, self.n_rows)]
            # arguments: starts, ends, cols, out (offset from out's base), x (offset), ldx, dy (offset from out's
            # base), ldd, r0, r1, blocks, xstep, dstep
            plan = self._plans[key] = Plan(
                [[[SDDMM, fn, starts, ends, self.cols.ctypes.data, 0, 0, width, dy_offset, width, r0, r1, batches,
                   self.n_in * width, self.n_rows * width, 0]] for r0, r1 in ranges], threads)
        plan.run(x.ctypes.data, out.ctypes.data)
