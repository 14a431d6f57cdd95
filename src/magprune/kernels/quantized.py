"""Kernels room (shared-weight products): sparse products whose weights are codebook entries, batch 1 and batched.

At batch 1 a sparse layer's time is the time to stream its index and value arrays (fp32 CSR: 4 bytes of value and
2 of column per nonzero). After weight sharing a row's nonzeros take at most K = 2**bits values, so the product is
stored *grouped*: within a row the nonzeros are sorted by codebook entry and cut into groups of four that share
one entry (a run whose length is not a multiple of four is padded with a column that points at a zero appended to
x). Per group the kernel reads four columns and one byte, the codebook index; per row

    out[r] += sum over groups g of codebook[label[g]] * (x[cols[4g]] + ... + x[cols[4g + 3]])

with one multiply-add per group into a vector accumulator: about 2.3 bytes per nonzero (padding included) instead
of 6, and no fp32 copy of the weights. A plan of separate per-run loops (tried first) was 2x slower than the fp32
kernel: a mispredicted branch at the end of every run.

``qspmv_{cols}(starts, ends, cols, book, x, out, r0, r1, from)``: rows ``r0 <= r < r1``, groups ``starts[r]`` to
``ends[r]``; ``book`` holds the codebook (:data:`MAX_VALUES` float32) followed by the group labels (uint8). AVX2
build: two groups per pass into two accumulators, scalar loads of x. AVX-512 build: four groups per pass, their
sixteen inputs by one gather and their shared values by a 4-lane gather (2.3x faster than the scalar kernel on
AlexNet fc6 at 5 bits, 1.42 -> 0.63 ms on 2 threads, this project's Intel Xeon). The fp32 matrix-vector kernel's
signature: plans run it on the pool's threads as ``SPMV`` records. ``qspmm_{width}_{cols}``: the batched product
(:meth:`QuantizedProduct.matmul`), ``SPMM`` records.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from magprune.kernels.csr import (
    WIDTHS,
    block_width,
    blocked_rows_head,
    blocked_rows_tail,
    column_chunks,
    gather_row_end,
    row_splits,
)
from magprune.kernels.jit import compiled, vector_lanes
from magprune.kernels.memory import huge_page_array, l2_cache_bytes
from magprune.kernels.pool import CHUNKS_PER_THREAD, SPMM, SPMV, Plan, spmv_row_start_ir

_INDEX_TYPES = {np.dtype(np.uint8): "i8", np.dtype(np.uint16): "i16", np.dtype(np.uint32): "i32"}
PARALLEL_MIN_NONZEROS = 1 << 19  # as for the fp32 matrix-vector product (csr.PARALLEL_MIN_NONZEROS)
PARALLEL_MIN_WORK = 1 << 20  # nonzeros x batch columns of a batched product (csr.PARALLEL_MIN_WORK)
MAX_VALUES = 256
GROUP = 4
LABELS_AT = 4 * MAX_VALUES + 64  # bytes of ``book`` before the group labels: the codebook, then n_in (int32) in a
# line of its own (the AVX-512 kernel's padding column)
PREFETCH_GROUPS = 256  # groups ahead whose columns the AVX-512 matrix-vector kernel prefetches (2 KiB at uint16);
# AlexNet fc6 at 5 bits after a dense layer, min of 30 on this project's Intel Xeon: 0.56 ms, 1024 within noise, 64
# 0.73 ms, none 0.91-0.93 ms


def _two_groups_a_pass(group: Callable[[str, str, str, str], list[str]]) -> list[str]:
    """IR of a grouped kernel's loop body from ``body:`` on: groups ``%g`` and ``%g + 1`` into the accumulator sets
    ``%acc0`` / ``%acc1`` (``group(tag, group index, accumulator, result)`` builds one), then the row's last group,
    if one is left, into ``%fin``; ends with the ``store:`` label."""
    return [*group("a", "%g", "%acc0", "%new0"), "  %g1 = add nuw i64 %g, 1", *group("b", "%g1", "%acc1", "%new1"),
            "  br label %loop", "rest:", "  %left = icmp ult i64 %g, %e", "  br i1 %left, label %last, label %store",
            "last:", *group("t", "%g", "%acc0", "%fin"), "  br label %store", "store:"]


def _qspmv_ir(index: str) -> str:
    lines = [f"define void @qspmv_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %book, ptr noalias %x, ptr noalias %out, i64 %r0, i64 %r1, ptr %from) nounwind {",
             "entry:", f"  %labels = getelementptr i8, ptr %book, i64 {LABELS_AT}",
             "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
             "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %store]",
             "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
             "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
             "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64",
             *spmv_row_start_ir(),
             "  br label %loop",
             "loop:", "  %g = phi i64 [%s, %row], [%g.next, %body]",
             "  %acc0 = phi float [%init, %row], [%new0, %body]",
             "  %acc1 = phi float [0.0, %row], [%new1, %body]",
             "  %g.next = add nuw i64 %g, 2", "  %more = icmp ule i64 %g.next, %e",
             "  br i1 %more, label %body, label %rest", "body:"]

    def group(tag: str, g: str, acc: str, new: str) -> list[str]:
        # scalar loads and adds: four x values summed in a tree, then one multiply-add by the group's shared value
        # (inserting the loads into a vector, as the fp32 kernel does, spends a shuffle per nonzero)
        out = [f"  %co{tag} = mul nuw i64 {g}, {GROUP}", f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 %co{tag}",
               f"  %cv{tag} = load <4 x {index}>, ptr %cp{tag}, align 1",
               f"  %cw{tag} = zext <4 x {index}> %cv{tag} to <4 x i64>"]
        for j in range(GROUP):
            out += [f"  %c{tag}.{j} = extractelement <4 x i64> %cw{tag}, i32 {j}",
                    f"  %xp{tag}.{j} = getelementptr float, ptr %x, i64 %c{tag}.{j}",
                    f"  %x{tag}.{j} = load float, ptr %xp{tag}.{j}"]
        out += [f"  %p{tag}.0 = fadd float %x{tag}.0, %x{tag}.1", f"  %p{tag}.1 = fadd float %x{tag}.2, %x{tag}.3",
                f"  %p{tag} = fadd float %p{tag}.0, %p{tag}.1",
                f"  %lp{tag} = getelementptr i8, ptr %labels, i64 {g}", f"  %l{tag} = load i8, ptr %lp{tag}",
                f"  %li{tag} = zext i8 %l{tag} to i64", f"  %wp{tag} = getelementptr float, ptr %book, i64 %li{tag}",
                f"  %w{tag} = load float, ptr %wp{tag}", f"  %m{tag} = fmul contract float %w{tag}, %p{tag}",
                f"  {new} = fadd contract float {acc}, %m{tag}"]
        return out

    lines += _two_groups_a_pass(group)
    lines += ["  %end0 = phi float [%acc0, %rest], [%fin, %last]",
              "  %sum = fadd float %end0, %acc1",
              "  store float %sum, ptr %outp", "  %o.next = add nuw i64 %o, 1",
              "  %rows.left = icmp ult i64 %o.next, %r1", "  br i1 %rows.left, label %row, label %exit",
              "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _qspmv_gather_ir(index: str) -> str:
    """IR of ``qspmv_{index}`` for AVX-512: four groups (sixteen slots) per pass, their inputs by one 16-lane gather
    (``vgatherdps``), their four shared values by a 4-lane gather from the codebook spread to four lanes each, one
    multiply-add; the row's last one to three groups by masked loads and gathers. Reads what the scalar kernel reads,
    with the fp32 batch-1 kernel's gathers instead of a scalar load per slot."""
    vec, i32 = "<16 x float>", "<16 x i32>"
    lanes = ", ".join(f"i32 {i}" for i in range(16))
    spread = ", ".join(f"i32 {i // 4}" for i in range(16))
    ind = f"<16 x {index}>"

    def step(tag: str, mask: str, lmask: str, acc: str, new: str) -> list[str]:
        full = lmask == "splat (i1 true)"
        cols = (f"  %cv{tag} = load {ind}, ptr %cp{tag}, align 1" if full else
                f"  %cv{tag} = call {ind} @llvm.masked.load.v16{index}.p0(ptr %cp{tag}, i32 1, <16 x i1> {mask}, "
                f"{ind} zeroinitializer)")
        labels = (f"  %lv{tag} = load <4 x i8>, ptr %lp{tag}, align 1" if full else
                  f"  %lv{tag} = call <4 x i8> @llvm.masked.load.v4i8.p0(ptr %lp{tag}, i32 1, <4 x i1> {lmask}, "
                  "<4 x i8> zeroinitializer)")
        return [f"  %co{tag} = mul nuw i64 %g, {GROUP}", f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 %co{tag}",
                cols, f"  %ci{tag} = {'bitcast' if index == 'i32' else 'zext'} {ind} %cv{tag} to {i32}",
                f"  %real{tag} = icmp ne {i32} %ci{tag}, %padv",  # padding slots read nothing: x is read in place
                f"  %gm{tag} = and <16 x i1> %real{tag}, {mask}",
                f"  %xp{tag} = getelementptr float, ptr %x, {i32} %ci{tag}",
                f"  %xg{tag} = call {vec} @llvm.masked.gather.v16f32.v16p0(<16 x ptr> %xp{tag}, i32 4, "
                f"<16 x i1> %gm{tag}, {vec} zeroinitializer)",
                f"  %lp{tag} = getelementptr i8, ptr %labels, i64 %g", labels,
                f"  %li{tag} = zext <4 x i8> %lv{tag} to <4 x i32>",
                f"  %wp{tag} = getelementptr float, ptr %book, <4 x i32> %li{tag}",
                f"  %w4{tag} = call <4 x float> @llvm.masked.gather.v4f32.v4p0(<4 x ptr> %wp{tag}, i32 4, "
                f"<4 x i1> {lmask}, <4 x float> zeroinitializer)",
                f"  %w{tag} = shufflevector <4 x float> %w4{tag}, <4 x float> poison, <16 x i32> <{spread}>",
                f"  {new} = call {vec} @llvm.fma.v16f32({vec} %xg{tag}, {vec} %w{tag}, {vec} {acc})"]

    return "\n".join([
        f"define void @qspmv_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
        "ptr noalias %book, ptr noalias %x, ptr noalias %out, i64 %r0, i64 %r1, ptr %from) nounwind {",
        "entry:", f"  %labels = getelementptr i8, ptr %book, i64 {LABELS_AT}",
        f"  %padp = getelementptr i8, ptr %book, i64 {4 * MAX_VALUES}", "  %pad = load i32, ptr %padp",
        f"  %pad0 = insertelement {i32} poison, i32 %pad, i32 0",
        f"  %padv = shufflevector {i32} %pad0, {i32} poison, <16 x i32> zeroinitializer",
        "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
        "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %store]",
        "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
        "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
        "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64", *spmv_row_start_ir(), "  br label %loop",
        "loop:", "  %g = phi i64 [%s, %row], [%g.next, %body]",
        f"  %acc = phi {vec} [zeroinitializer, %row], [%new, %body]",
        "  %g.next = add nuw i64 %g, 4", "  %more = icmp ule i64 %g.next, %e",
        "  br i1 %more, label %body, label %rest",
        "body:", f"  %pg = add i64 %g, {PREFETCH_GROUPS}", "  %pgo = mul nuw i64 %pg, 4",
        f"  %pfc = getelementptr {index}, ptr %cols, i64 %pgo",
        "  call void @llvm.prefetch.p0(ptr %pfc, i32 0, i32 3, i32 1)",
        *step("b", "splat (i1 true)", "splat (i1 true)", "%acc", "%new"), "  br label %loop",
        "rest:", "  %left = icmp ult i64 %g, %e", "  br i1 %left, label %tail, label %sum",
        "tail:", "  %n = sub i64 %e, %g", "  %n32 = trunc i64 %n to i32", "  %slots = mul i32 %n32, 4",
        f"  %sv0 = insertelement {i32} poison, i32 %slots, i32 0",
        f"  %sv = shufflevector {i32} %sv0, {i32} poison, <16 x i32> zeroinitializer",
        f"  %m = icmp ult {i32} <{lanes}>, %sv",
        "  %nv0 = insertelement <4 x i32> poison, i32 %n32, i32 0",
        "  %nv = shufflevector <4 x i32> %nv0, <4 x i32> poison, <4 x i32> zeroinitializer",
        "  %lm = icmp ult <4 x i32> <i32 0, i32 1, i32 2, i32 3>, %nv",
        *step("t", "%m", "%lm", "%acc", "%last"), "  br label %sum", *gather_row_end()])


def _qspmm_ir(width: int, index: str, lanes: int) -> str:
    """IR of ``qspmm_{width}_{index}``, the batched product in the pool's ``SPMM`` convention: for each of
    ``blocks`` blocks (x and out advance by ``xstep`` / ``ostep`` floats), each of ``chunks`` chunks of ``width``
    columns and rows ``r0 <= r < r1``: ``out[r, c:c+width] += sum over groups g of codebook[label[g]] *
    (x[cols[4g], c:c+width] + ... + x[cols[4g + 3], c:c+width])``, x and out row-major with leading dimensions
    ``ldx`` / ``ldo`` (x's row ``n_in`` is the zero row the padding points at). Per group four row loads summed,
    one multiply-add by the broadcast shared value; two groups per pass into two accumulator sets."""
    lanes = min(lanes, width)
    vec = f"<{lanes} x float>"
    vectors = width // lanes
    lines = [f"define void @qspmm_{width}_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %book, ptr noalias %x, i64 %ldx, ptr noalias %out, i64 %ldo, i64 %r0, i64 %r1, "
             "i64 %chunks, i64 %blocks, i64 %xstep, i64 %ostep) nounwind {",
             *blocked_rows_head(width, (f"  %labels = getelementptr i8, ptr %book, i64 {LABELS_AT}",))]
    for i in range(vectors):
        lines += [f"  %op{i} = getelementptr float, ptr %orow, i64 {lanes * i}",
                  f"  %init{i} = load {vec}, ptr %op{i}, align 4"]
    lines += ["  br label %loop", "loop:", "  %g = phi i64 [%s, %row], [%g.next, %body]"]
    for u, start in ((0, "%init{i}"), (1, "zeroinitializer")):
        lines += [f"  %acc{u}.{i} = phi {vec} [{start.format(i=i)}, %row], [%new{u}.{i}, %body]"
                  for i in range(vectors)]
    lines += ["  %g.next = add nuw i64 %g, 2", "  %more = icmp ule i64 %g.next, %e",
              "  br i1 %more, label %body, label %rest", "body:"]

    def group(tag: str, g: str, acc: str, new: str) -> list[str]:
        out = [f"  %co{tag} = mul nuw i64 {g}, {GROUP}", f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 %co{tag}",
               f"  %cv{tag} = load <4 x {index}>, ptr %cp{tag}, align 1",
               f"  %cw{tag} = zext <4 x {index}> %cv{tag} to <4 x i64>",
               f"  %lp{tag} = getelementptr i8, ptr %labels, i64 {g}", f"  %l{tag} = load i8, ptr %lp{tag}",
               f"  %li{tag} = zext i8 %l{tag} to i64", f"  %wp{tag} = getelementptr float, ptr %book, i64 %li{tag}",
               f"  %w{tag} = load float, ptr %wp{tag}",
               f"  %wi{tag} = insertelement {vec} poison, float %w{tag}, i32 0",
               f"  %wb{tag} = shufflevector {vec} %wi{tag}, {vec} poison, <{lanes} x i32> zeroinitializer"]
        for j in range(GROUP):
            out += [f"  %c{tag}.{j} = extractelement <4 x i64> %cw{tag}, i32 {j}",
                    f"  %xo{tag}.{j} = mul nuw i64 %c{tag}.{j}, %ldx",
                    f"  %xr{tag}.{j} = getelementptr float, ptr %xc, i64 %xo{tag}.{j}"]
        for i in range(vectors):
            for j in range(GROUP):
                out += [f"  %xp{tag}.{j}.{i} = getelementptr float, ptr %xr{tag}.{j}, i64 {lanes * i}",
                        f"  %xv{tag}.{j}.{i} = load {vec}, ptr %xp{tag}.{j}.{i}, align 4"]
            out += [f"  %pa{tag}.{i} = fadd {vec} %xv{tag}.0.{i}, %xv{tag}.1.{i}",
                    f"  %pb{tag}.{i} = fadd {vec} %xv{tag}.2.{i}, %xv{tag}.3.{i}",
                    f"  %p{tag}.{i} = fadd {vec} %pa{tag}.{i}, %pb{tag}.{i}",
                    f"  %m{tag}.{i} = fmul contract {vec} %wb{tag}, %p{tag}.{i}",
                    f"  {new}.{i} = fadd contract {vec} {acc}.{i}, %m{tag}.{i}"]
        return out

    lines += _two_groups_a_pass(group)
    lines += [f"  %end{i} = phi {vec} [%acc0.{i}, %rest], [%fin.{i}, %last]" for i in range(vectors)]
    for i in range(vectors):
        lines += [f"  %sum{i} = fadd {vec} %end{i}, %acc1.{i}", f"  store {vec} %sum{i}, ptr %op{i}, align 4"]
    lines += blocked_rows_tail()
    return "\n".join(lines)


def _ir() -> str:
    lanes = vector_lanes()
    vec = "<16 x float>"
    gather = [f"declare {vec} @llvm.masked.gather.v16f32.v16p0(<16 x ptr>, i32, <16 x i1>, {vec})",
              "declare <4 x float> @llvm.masked.gather.v4f32.v4p0(<4 x ptr>, i32, <4 x i1>, <4 x float>)",
              f"declare {vec} @llvm.fma.v16f32({vec}, {vec}, {vec})",
              f"declare float @llvm.vector.reduce.fadd.v16f32(float, {vec})",
              "declare <4 x i8> @llvm.masked.load.v4i8.p0(ptr, i32, <4 x i1>, <4 x i8>)",
              "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
    gather += [f"declare <16 x {t}> @llvm.masked.load.v16{t}.p0(ptr, i32, <16 x i1>, <16 x {t}>)"
               for t in _INDEX_TYPES.values()]
    matvec = _qspmv_gather_ir if lanes == 16 else _qspmv_ir
    return "\n\n".join(["declare float @llvm.vector.reduce.fadd.v4f32(float, <4 x float>)"]
                        + (gather if lanes == 16 else [])
                        + [matvec(t) for t in _INDEX_TYPES.values()]
                        + [_qspmm_ir(w, t, lanes) for w in WIDTHS for t in _INDEX_TYPES.values()])


def _addresses(engine) -> dict:
    found: dict = {t: engine.get_function_address(f"qspmv_{t}") for t in _INDEX_TYPES.values()}
    found.update({(w, t): engine.get_function_address(f"qspmm_{w}_{t}") for w in WIDTHS
                  for t in _INDEX_TYPES.values()})
    return found


def kernel(index_dtype: np.dtype, width: int = 1) -> int:
    """Address of the compiled product for a column dtype (uint8/16/32): the matrix-vector one (``width`` 1) or
    the batched one over chunks of ``width`` columns (one of ``csr.WIDTHS``); compiled on first use."""
    index = _INDEX_TYPES[np.dtype(index_dtype)]
    return compiled("quantized", _ir, _addresses)[index if width == 1 else (width, index)]


class QuantizedProduct:
    """A sparse matrix with shared values, grouped for :func:`kernel` (see the module docstring).

    Built from the coordinates of the nonzeros (``rows``, ``cols``), their codebook ``labels`` and the
    ``codebook`` (at most :data:`MAX_VALUES` entries); ``n_rows`` x ``n_in``."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, labels: np.ndarray, codebook: np.ndarray,
                 n_rows: int, n_in: int) -> None:
        codebook = np.asarray(codebook, dtype=np.float32).reshape(-1)
        k = codebook.size
        if not 1 <= k <= MAX_VALUES or rows.shape != cols.shape or rows.shape != labels.shape:
            raise ValueError(f"QuantizedProduct wants 1..{MAX_VALUES} codebook entries and rows, cols, labels of one "
                             f"shape, got {k} entries and shapes {rows.shape}, {cols.shape}, {labels.shape}")
        rows, cols, labels = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (rows, cols, labels))
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_in
                          or labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"QuantizedProduct: coordinates or labels outside {n_rows}x{n_in} / {k} entries")
        order = np.lexsort((cols, labels, rows))
        run_of = (rows * k + labels)[order]  # runs: (row, label), in row-major order
        runs = np.bincount(run_of, minlength=n_rows * k)
        groups = -(-runs // GROUP)
        first_group = np.concatenate([[0], np.cumsum(groups)])
        first_member = np.concatenate([[0], np.cumsum(runs)])
        if first_group[-1] * GROUP >= 2**31:
            raise ValueError(f"{rows.size:,} nonzeros are beyond the kernel's 32-bit group indices")
        index_dtype = next(d for d in _INDEX_TYPES if n_in <= np.iinfo(d).max)  # n_in: the zero padding slot
        slots = np.full(int(first_group[-1]) * GROUP, n_in, dtype=index_dtype)
        rank = np.arange(rows.size) - first_member[run_of]
        slots[first_group[run_of] * GROUP + rank] = cols[order]
        self.n_rows, self.n_in, self.k, self.nnz = n_rows, n_in, k, int(rows.size)
        self.codebook = codebook.copy()
        book = np.zeros(LABELS_AT + int(first_group[-1]), dtype=np.uint8)
        book[:4 * k] = self.codebook.view(np.uint8)
        book[4 * MAX_VALUES:4 * MAX_VALUES + 4] = np.array([n_in], dtype=np.int32).view(np.uint8)
        book[LABELS_AT:] = np.repeat(np.tile(np.arange(k), n_rows), groups).astype(np.uint8)
        self.cols, self.book = huge_page_array(slots), huge_page_array(book)
        row_groups = first_group[::k][:n_rows + 1] if n_rows else np.zeros(1, dtype=np.int64)
        self.indptr = np.ascontiguousarray(row_groups.astype(np.int64))  # groups per row, cumulative
        self.starts = np.ascontiguousarray(self.indptr[:-1].astype(np.int32))
        self.ends = np.ascontiguousarray(self.indptr[1:].astype(np.int32))
        self._plans: dict = {}
        # the AVX-512 kernel masks padded slots out of its gathers: it reads x where it lies, n_in floats
        self.reads_x_in_place = vector_lanes() == 16

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plans"] = {}  # plans hold this object's addresses (and ctypes functions, which do not pickle)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.reads_x_in_place = vector_lanes() == 16  # this host's build

    @property
    def nbytes(self) -> int:
        """Bytes a product streams: columns (with padding), group labels, codebook and row bounds."""
        return self.cols.nbytes + self.book.nbytes + self.starts.nbytes + self.ends.nbytes

    def matvec(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out += W @ x for float32 x (n_in,) and contiguous float32 out (n_rows,). The AVX-512 kernel reads a
        contiguous x in place (its padded slots read nothing, :attr:`reads_x_in_place`); otherwise x is copied next
        to the zero that padded slots read (n_in floats: microseconds against the product's milliseconds), a copy of
        each call's own: one kept on the product and shared by concurrent calls gave wrong results (until
        2026-12-07)."""
        if x.shape != (self.n_in,) or x.dtype != np.float32:
            raise ValueError(f"matvec wants a float32 x ({self.n_in},), got {x.dtype} {x.shape}")
        if out.shape != (self.n_rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"matvec wants a contiguous float32 out ({self.n_rows},), got {out.dtype} {out.shape}")
        if not (self.reads_x_in_place and x.flags.c_contiguous):
            padded = np.empty(self.n_in + 1, dtype=np.float32)
            padded[:-1] = x
            padded[-1] = 0.0
            x = padded
        self.matvec_plan(threads).run(x.ctypes.data, out.ctypes.data)

    def matvec_plan(self, threads: int) -> Plan:
        """The cached batch-1 plan on up to ``threads`` threads: ``plan.run(x, out, start)`` with the addresses of x
        (n_in float32, followed by a zero unless :attr:`reads_x_in_place`), out (n_rows float32) and where each
        row's sum starts (n_rows float32, a bias: out = bias + W x) or 0 (out += W x)."""
        threads = threads if self.nnz >= PARALLEL_MIN_NONZEROS else 1
        plan = self._plans.get(threads)
        if plan is None:
            fn = kernel(self.cols.dtype)
            parts = threads * CHUNKS_PER_THREAD if threads > 1 else 1
            ranges = row_splits(self.indptr, parts) if parts > 1 else ([(0, self.n_rows)] if self.n_rows else [])
            data = [self.starts.ctypes.data, self.ends.ctypes.data, self.cols.ctypes.data, self.book.ctypes.data]
            plan = self._plans[threads] = Plan([[[SPMV, fn, *data, 0, 0, r0, r1] + [0] * 6] for r0, r1 in ranges]
                                               or [[]], threads)
        return plan

    def batch_columns(self) -> int:
        """Batch columns per block of :meth:`matmul`'s input: the widest of 8, 16 and 32 whose block of x (n_in + 1
        rows, read at random four rows a group) fits in one core's L2. Measured on this project's Intel Xeon (2 MB
        L2, batch 32 and 256, 5-bit AlexNet fc6 and VGG-16 fc6 shapes): 32 best for 9216 inputs (a 1.2 MB block;
        64, 2.4 MB, 1.3-1.5x slower at batch 64-256), 16 for 25088 (1.6 MB; 32 1.5x slower, 8 1.3x)."""
        fitting = [w for w in (16, 32) if (self.n_in + 1) * w * 4 <= l2_cache_bytes()]
        return max(fitting, default=8)

    def matmul(self, x: np.ndarray, out: np.ndarray, threads: int = 1) -> None:
        """out[b] += W @ x[b, :n_in] for every block b: x (B, n_in + 1, m) whose row n_in is zero (what padded
        columns read) and out (B, n_rows, m), C-contiguous float32, m a multiple of 8 (batch columns, the batch
        transposed: each nonzero group reads whole rows of x)."""
        blocks, rows, m = x.shape
        if m % 8 or rows != self.n_in + 1 or out.shape != (blocks, self.n_rows, m) or x.dtype != np.float32 \
                or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"matmul wants C-contiguous float32 x (B, {self.n_in + 1}, m) and out (B, {self.n_rows}, "
                             f"m) with m a multiple of 8, got {x.dtype} {x.shape} and {out.dtype} {out.shape}")
        if m == 0 or blocks == 0 or self.n_rows == 0:
            return
        threads = threads if self.nnz * m * blocks >= PARALLEL_MIN_WORK else 1
        key = ("matmul", blocks, m, threads)
        plan = self._plans.get(key)
        if plan is None:
            parts = threads * CHUNKS_PER_THREAD if threads > 1 else 1
            ranges = row_splits(self.indptr, parts) if parts > 1 else [(0, self.n_rows)]
            data = [self.starts.ctypes.data, self.ends.ctypes.data, self.cols.ctypes.data, self.book.ctypes.data]
            steps = [(self.n_in + 1) * m, self.n_rows * m]
            plan = self._plans[key] = Plan(
                [[[SPMM, kernel(self.cols.dtype, width), *data, 4 * offset, m, 4 * offset, m, r0, r1, count, blocks,
                   *steps] for offset, width, count in column_chunks(m, block_width())] for r0, r1 in ranges], threads)
        plan.run(x.ctypes.data, out.ctypes.data)
