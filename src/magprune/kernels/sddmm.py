"""Kernels room (sampled products): a dense x dense product evaluated only at the positions of a CSR pattern (SDDMM).

The weight gradient of a pruned Linear is needed only at its kept connections: for nonzero k at (row o, column i),
``out[k] = sum_c dy[o, c] * x[i, c]`` over the m batch columns, with x (n_in, m) and dy (n_rows, m) row-major: the
layer's input and output gradient with the batch as the fast dimension (the layout sparse compute keeps its
activations in). Per nonzero, one dot product of two contiguous rows of m floats.

``sddmm_{L}_{index}`` writes into ``out`` the rows ``r0 <= r < r1`` summed over the blocks of x and dy (a convolution's
im2col columns come as one block per image, so that a block stays in cache) for vectors of L floats (8: AVX2,
16: AVX-512; m a multiple of L) and column-index width uint8/16/32, as :data:`.pool.SDDMM` records. It takes the
nonzeros of a row :data:`GROUP` at a time: that many independent multiply-add chains, one ``<L x float>``
accumulator each, and one transposing reduction tree that sums them into ``GROUP`` results written (first block)
or added with one vector load and store (the first kernel, a horizontal sum per nonzero, two at a time, took 2x as
long on LeNet-300-100's fc1 at batch 64 on AMD Zen 3: 0.18 ms against 0.10 ms).
"""

from __future__ import annotations

import numpy as np

from magprune.kernels.csr import row_splits
from magprune.kernels.jit import compiled, vector_lanes
from magprune.kernels.pool import CHUNKS_PER_THREAD, SDDMM, Plan

LANES = (8, 16)
GROUP = 8  # nonzeros per pass: 8 accumulators + the dy vector fit AVX2's 16 registers
_INDEX_TYPES = {np.dtype(np.uint8): "i8", np.dtype(np.uint16): "i16", np.dtype(np.uint32): "i32"}
PARALLEL_MIN_WORK = 1 << 20  # multiply-adds (nonzeros x batch columns) from which the rows are split over threads, as
# for the products (csr.PARALLEL_MIN_WORK: LeNet-300-100's fc1 at batch 64, 1.2M, now runs on both threads)


def _reduce_tree(accs: list[str], lanes: int, out: list[str]) -> str:
    """IR (appended to ``out``) summing each of the GROUP ``<lanes x float>`` vectors ``accs`` into one lane of a
    ``<GROUP x float>`` result, in order: pairs of vectors are folded (first halves of each segment + second
    halves) until one vector holds a segment per accumulator, then that vector is folded within itself."""
    counter = [0]

    def name() -> str:
        counter[0] += 1
        return f"%rt{counter[0]}"

    vec = f"<{lanes} x float>"
    # each entry: (value, width, segments: list of accumulator indices, each segment width // len(segments) lanes)
    items = [(a, lanes, [i]) for i, a in enumerate(accs)]
    while len(items) > 1:
        paired = []
        for (p, width, ps), (q, _, qs) in zip(items[0::2], items[1::2], strict=True):
            seg = width // len(ps)
            half = seg // 2
            first = [s * seg + j for s in range(len(ps)) for j in range(half)]
            second = [s * seg + half + j for s in range(len(ps)) for j in range(half)]
            lo = first + [width + i for i in first]
            hi = second + [width + i for i in second]
            a, b, c = name(), name(), name()
            mask = lambda idx: "<" + ", ".join(f"i32 {i}" for i in idx) + ">"  # noqa: E731
            out += [f"  {a} = shufflevector {vec} {p}, {vec} {q}, <{width} x i32> {mask(lo)}",
                    f"  {b} = shufflevector {vec} {p}, {vec} {q}, <{width} x i32> {mask(hi)}",
                    f"  {c} = fadd {vec} {a}, {b}"]
            paired.append((c, width, ps + qs))
        items = paired
    value, width, segments = items[0]
    while width > len(segments):  # fold within the one vector until a lane per accumulator
        seg = width // len(segments)
        half = seg // 2
        first = [s * seg + j for s in range(len(segments)) for j in range(half)]
        second = [s * seg + half + j for s in range(len(segments)) for j in range(half)]
        a, b, c = name(), name(), name()
        src = f"<{width} x float>"
        new = f"<{width // 2} x float>"
        out += [f"  {a} = shufflevector {src} {value}, {src} poison, <{width // 2} x i32> "
                "<" + ", ".join(f"i32 {i}" for i in first) + ">",
                f"  {b} = shufflevector {src} {value}, {src} poison, <{width // 2} x i32> "
                "<" + ", ".join(f"i32 {i}" for i in second) + ">",
                f"  {c} = fadd {new} {a}, {b}"]
        value, width = c, width // 2
    order = [segments.index(i) for i in range(len(segments))]
    if order != list(range(len(segments))):
        final = name()
        src = f"<{width} x float>"
        out.append(f"  {final} = shufflevector {src} {value}, {src} poison, <{width} x i32> "
                   "<" + ", ".join(f"i32 {i}" for i in order) + ">")
        value = final
    return value


def _sddmm_ir(lanes: int, index: str) -> str:
    vec = f"<{lanes} x float>"
    lines = [f"define void @sddmm_{lanes}_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %gv, ptr noalias %x0, i64 %ldx, ptr noalias %dy0, i64 %ldd, i64 %r0, i64 %r1, "
             "i64 %m, i64 %blocks, i64 %xstep, i64 %dstep) nounwind {",
             "entry:", "  %any = icmp ult i64 %r0, %r1", "  %cols.any = icmp ugt i64 %m, 0",
             "  %go = and i1 %any, %cols.any", "  br i1 %go, label %block, label %exit",
             # blocks outermost (each block's x stays in cache for all the rows), the sums written into gv (the first
             # block: nothing to zero before), then added
             "block:", "  %bk = phi i64 [0, %entry], [%bk.next, %block.end]",
             "  %xboff = mul nuw i64 %bk, %xstep", "  %x = getelementptr float, ptr %x0, i64 %xboff",
             "  %dboff = mul nuw i64 %bk, %dstep", "  %dy = getelementptr float, ptr %dy0, i64 %dboff",
             "  %first = icmp eq i64 %bk, 0", "  br label %row",
             "row:", "  %o = phi i64 [%r0, %block], [%o.next, %row.end]",
             "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
             "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
             "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64",
             "  %doff = mul nuw i64 %o, %ldd", "  %drow = getelementptr float, ptr %dy, i64 %doff",
             "  br label %group",
             "group:", "  %k = phi i64 [%s, %row], [%k.next, %group.store]",
             f"  %k.next = add nuw i64 %k, {GROUP}", "  %full = icmp ule i64 %k.next, %e",
             "  br i1 %full, label %group.body, label %single"]

    def column(tag: str, k: str) -> list[str]:
        return [f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 {k}", f"  %cn{tag} = load {index}, ptr %cp{tag}",
                f"  %c{tag} = zext {index} %cn{tag} to i64", f"  %xo{tag} = mul nuw i64 %c{tag}, %ldx",
                f"  %xrow{tag} = getelementptr float, ptr %x, i64 %xo{tag}"]

    lines.append("group.body:")
    for g in range(GROUP):
        if g:
            lines.append(f"  %kg{g} = add nuw i64 %k, {g}")
        lines += column(f"g{g}", "%k" if g == 0 else f"%kg{g}")
    lines += ["  br label %gcol", "gcol:", "  %j = phi i64 [0, %group.body], [%j.next, %gcol]"]
    lines += [f"  %gacc{g} = phi {vec} [zeroinitializer, %group.body], [%gnew{g}, %gcol]" for g in range(GROUP)]
    lines += ["  %dp = getelementptr float, ptr %drow, i64 %j", f"  %dv = load {vec}, ptr %dp, align 4"]
    for g in range(GROUP):
        lines += [f"  %xp{g} = getelementptr float, ptr %xrowg{g}, i64 %j",
                  f"  %xv{g} = load {vec}, ptr %xp{g}, align 4",
                  f"  %gm{g} = fmul contract {vec} %dv, %xv{g}", f"  %gnew{g} = fadd contract {vec} %gacc{g}, %gm{g}"]
    lines += [f"  %j.next = add nuw i64 %j, {lanes}", "  %jmore = icmp ult i64 %j.next, %m",
              "  br i1 %jmore, label %gcol, label %group.store", "group.store:"]
    result = _reduce_tree([f"%gnew{g}" for g in range(GROUP)], lanes, lines)
    lines += ["  %gp = getelementptr float, ptr %gv, i64 %k", f"  %gload = load <{GROUP} x float>, ptr %gp, align 4",
              f"  %gold = select i1 %first, <{GROUP} x float> zeroinitializer, <{GROUP} x float> %gload",
              f"  %gsum = fadd <{GROUP} x float> %gold, {result}",
              f"  store <{GROUP} x float> %gsum, ptr %gp, align 4",
              "  br label %group",
              "single:", "  %k1 = phi i64 [%k, %group], [%k1.next, %single.store]",
              "  %one = icmp ult i64 %k1, %e", "  br i1 %one, label %single.body, label %row.end",
              "single.body:", *column("t", "%k1"), "  br label %scol",
              "scol:", "  %sj = phi i64 [0, %single.body], [%sj.next, %scol]",
              f"  %sacc = phi {vec} [zeroinitializer, %single.body], [%snew, %scol]",
              "  %sdp = getelementptr float, ptr %drow, i64 %sj", f"  %sdv = load {vec}, ptr %sdp, align 4",
              "  %sxp = getelementptr float, ptr %xrowt, i64 %sj", f"  %sxv = load {vec}, ptr %sxp, align 4",
              f"  %sm = fmul contract {vec} %sdv, %sxv", f"  %snew = fadd contract {vec} %sacc, %sm",
              f"  %sj.next = add nuw i64 %sj, {lanes}", "  %sjmore = icmp ult i64 %sj.next, %m",
              "  br i1 %sjmore, label %scol, label %single.store",
              "single.store:",
              f"  %ssum = call reassoc float @llvm.vector.reduce.fadd.v{lanes}f32(float 0.0, {vec} %snew)",
              "  %sgp = getelementptr float, ptr %gv, i64 %k1", "  %sload = load float, ptr %sgp",
              "  %sold = select i1 %first, float 0.0, float %sload",
              "  %snext = fadd float %sold, %ssum", "  store float %snext, ptr %sgp",
              "  %k1.next = add nuw i64 %k1, 1", "  br label %single",
              "row.end:", "  %o.next = add nuw i64 %o, 1", "  %rows.left = icmp ult i64 %o.next, %r1",
              "  br i1 %rows.left, label %row, label %block.end",
              "block.end:", "  %bk.next = add nuw i64 %bk, 1", "  %bmore = icmp ult i64 %bk.next, %blocks",
              "  br i1 %bmore, label %block, label %exit", "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _row_sums_ir() -> str:
    """IR of ``row_sums(r0, r1, m, out, _, ldd, dy, _ x 7)``: ``out[o] = sum_{c < m} dy[o * ldd + c]`` for r0 <= o <
    r1, m > 0 a multiple of 8, in the SDDMM records' calling convention (out and dy with their bases added): a
    Linear layer's bias gradient, written by the tasks of its weight gradient's plan."""
    params = ", ".join(["i64 %r0", "i64 %r1", "i64 %m", "ptr noalias %out", "ptr %unused4", "i64 %ldd",
                        "ptr noalias %dy"] + [f"i64 %unused{j}" for j in range(7, 14)])
    return "\n".join([
        f"define void @row_sums({params}) nounwind {{", "entry:", "  %any = icmp ult i64 %r0, %r1",
        "  br i1 %any, label %row, label %exit",
        "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %row.end]", "  %doff = mul nuw i64 %o, %ldd",
        "  %drow = getelementptr float, ptr %dy, i64 %doff", "  br label %col",
        "col:", "  %j = phi i64 [0, %row], [%j.next, %col]",
        "  %acc = phi <8 x float> [zeroinitializer, %row], [%new, %col]",
        "  %dp = getelementptr float, ptr %drow, i64 %j", "  %dv = load <8 x float>, ptr %dp, align 4",
        "  %new = fadd <8 x float> %acc, %dv", "  %j.next = add nuw i64 %j, 8", "  %more = icmp ult i64 %j.next, %m",
        "  br i1 %more, label %col, label %row.end",
        "row.end:", "  %sum = call reassoc float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> %new)",
        "  %op = getelementptr float, ptr %out, i64 %o", "  store float %sum, ptr %op",
        "  %o.next = add nuw i64 %o, 1", "  %rows.left = icmp ult i64 %o.next, %r1",
        "  br i1 %rows.left, label %row, label %exit",
        "exit:", "  ret void", "}"])


def _module_ir() -> str:
    return "\n\n".join([f"declare float @llvm.vector.reduce.fadd.v{w}f32(float, <{w} x float>)" for w in LANES]
                       + [_sddmm_ir(w, t) for w in LANES for t in _INDEX_TYPES.values()] + [_row_sums_ir()])


def _addresses(engine) -> dict:
    found = {(w, t): engine.get_function_address(f"sddmm_{w}_{t}") for w in LANES for t in _INDEX_TYPES.values()}
    found["row_sums"] = engine.get_function_address("row_sums")
    return found


def kernel(lanes: int, index_dtype: np.dtype) -> int:
    """Address of the compiled kernel for vectors of ``lanes`` floats (one of LANES) and a column-index dtype."""
    return compiled("sddmm", _module_ir, _addresses)[lanes, _INDEX_TYPES[np.dtype(index_dtype)]]


def row_sums_kernel() -> int:
    """Address of ``row_sums`` (see :func:`_row_sums_ir`)."""
    return compiled("sddmm", _module_ir, _addresses)["row_sums"]


class SampledProduct:
    """``out[k] = sum over columns c of dy[row_k, c] * x[cols[k], c]`` for every nonzero k of a CSR pattern (int32
    row pointers, uint8/16/32 column indices); rows split over the pool's threads by nonzeros.

    Plans are cached per call shape with the addresses of x, dy and out left out. Pickling and copying keep only the
    pattern."""

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
        """Write the sampled products into ``out`` (nnz,) for x (n_in, m) and dy (n_rows, m), or blocks of them
        (B, n_in, m) and (B, n_rows, m) summed over the blocks; C-contiguous float32 with m a multiple of 8."""
        x3, dy3 = (x[None], dy[None]) if x.ndim == 2 and dy.ndim == 2 else (x, dy)
        if x3.ndim != 3 or x3.shape[1] != self.n_in or x3.shape[2] % 8 \
                or dy3.shape != (x3.shape[0], self.n_rows, x3.shape[2]) or out.shape != (self.nnz,) \
                or not all(a.dtype == np.float32 and a.flags.c_contiguous for a in (x3, dy3, out)):
            raise ValueError(f"SampledProduct.run wants C-contiguous float32 x ([B,] {self.n_in}, m), dy "
                             f"([B,] {self.n_rows}, m) with m a multiple of 8 and out ({self.nnz},), got {x.dtype} "
                             f"{x.shape}, {dy.dtype} {dy.shape}, {out.dtype} {out.shape}")
        blocks, _, m = x3.shape
        if self.nnz == 0 or m == 0 or blocks == 0:
            out[:] = 0.0
            return
        self.plan(m, threads, blocks=blocks).run(x3.ctypes.data, out.ctypes.data, dy3.ctypes.data)

    def plan(self, m: int, threads: int, ld: int | None = None, blocks: int = 1, *, ldx: int | None = None,
             ldd: int | None = None, x_step: int | None = None, d_step: int | None = None, d_offset: int = 0,
             products: bool = True, row_sums: int | None = None) -> Plan:
        """The plan of :meth:`run` for ``blocks`` blocks of m > 0 columns (a multiple of 8) of x and dy, rows
        ``ld`` floats apart (default m), nnz > 0: ``plan.run(x_address, out_address, dy_address)`` *writes* the
        products into out (whatever it held; the caller vouches for the arrays).

        ``ldx``, ``ldd`` (floats from one row of x, dy to the next; default ld), ``x_step``, ``d_step`` (floats from
        one block to the next; default n_in * ldx, n_rows * ldd) and ``d_offset`` (floats from dy's address to its
        first row) give other layouts: with ldx = 1 the columns are offsets into a flat x (a stride-1 convolution's
        weight gradient over padded images, see :meth:`.CSRProduct.flat_plan`).

        ``row_sums`` (one block): the tasks also write each row's sum of dy over the m columns at ``row_sums`` floats
        past out's address (a Linear layer's bias gradient: no pass or call of its own); ``products=False``: only
        those (a frozen weight, a trained bias; nnz may then be 0)."""
        if row_sums is not None and blocks != 1:
            raise ValueError("row sums are written for one block")
        if not products and row_sums is None:
            raise ValueError("a plan of neither products nor row sums does nothing")
        lanes = 16 if vector_lanes() == 16 and m % 16 == 0 else 8
        threads = threads if self.nnz * m * blocks >= PARALLEL_MIN_WORK and self.nnz else 1
        ld = ld or m
        ldx, ldd = ldx or ld, ldd or ld
        x_step = self.n_in * ldx if x_step is None else x_step
        d_step = self.n_rows * ldd if d_step is None else d_step
        key = (threads, m, lanes, ldx, ldd, blocks, x_step, d_step, d_offset, products, row_sums)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:
                self._plans.clear()
            fn = kernel(lanes, self.cols.dtype)
            starts, ends = self.indptr.ctypes.data, self.indptr.ctypes.data + 4
            ranges = row_splits(self.indptr, threads * CHUNKS_PER_THREAD) if threads > 1 else [(0, self.n_rows)]
            # arguments: starts, ends, cols, out (offset from out's base), x (offset from x's), ldx, dy (offset from
            # dy's base, bytes), ldd, r0, r1, m, blocks, x and dy floats from one block to the next
            sums = [] if row_sums is None else [[SDDMM, row_sums_kernel(), 0, 0, m, 4 * row_sums, 0, ldd,
                                                 4 * d_offset] + [0] * 7]
            plan = self._plans[key] = Plan(
                [([[SDDMM, fn, starts, ends, self.cols.ctypes.data, 0, 0, ldx, 4 * d_offset, ldd, r0, r1, m, blocks,
                    x_step, d_step]] if products else [])
                 + [[*record[:2], r0, r1, *record[4:]] for record in sums] for r0, r1 in ranges], threads)
        return plan
