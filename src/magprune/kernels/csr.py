"""Kernels room (CSR products): sparse x dense products for the sparse inference modules, compiled from LLVM IR.

A CSR x dense-block product wants each output row's accumulators held in vector registers across the row's
nonzeros: one broadcast weight times one contiguous row of the input per nonzero. numba (tried first) vectorizes
only the short loop over the block's columns and keeps the accumulators in memory, with its SLP vectorizer off:
2-3x slower than the kernels below. Its matrix-vector loop also did not run in parallel.

Kernels, per column-index width (uint8/16/32), run as plans on :mod:`.pool`:
- ``spmm_{W}``: ``out[r, c:c+W] += sum_k vals[k] * x[cols[k], c:c+W]`` for rows ``r0 <= r < r1`` and ``chunks``
  consecutive column chunks c, over ``blocks`` blocks of x and out (row-major, leading dimensions ``ldx``/``ldo``);
  W in WIDTHS (1 to 8 vectors of 8 floats);
- ``spmv``: ``out[r] += sum_k vals[k] * x[cols[k]]`` (batch 1), the index and value streams prefetched ahead.
  AVX2 build: four nonzeros per vector multiply-add with scalar loads of x (``vgatherdps`` measured 20% slower on
  this project's AMD EPYC, 1-byte delta-coded indices 30% slower: a serial running sum). AVX-512 build: sixteen
  nonzeros per ``vgatherdps``, the row's last ones by a masked gather (1.6-1.9x faster than the scalar-load kernel
  on this project's Intel Xeon, 9216x4096 and 4096x4096 layers at 9%; the scalar loads' inserts and index
  extractions all queue on one shuffle port there).
- ``spmv_delta`` (AVX-512 build): the same product over 1-byte gaps between a row's columns, restored by a
  vector prefix sum per sixteen nonzeros (:func:`delta_rows`; the absolute-column kernel where a gap exceeds 255).
  A serial running sum made this 30% slower on AVX2; in sixteen lanes it costs four shuffles and adds, hidden
  behind the gather, and saves a sixth of the bytes read.
"""

from __future__ import annotations

import itertools

import numpy as np

from magprune.kernels.jit import compiled, vector_lanes
from magprune.kernels.memory import huge_page_array, l2_cache_bytes
from magprune.kernels.pool import CHUNKS_PER_THREAD, SPMM, SPMV, Plan, spmv_row_start_ir

WIDTHS = (8, 16, 32, 64)  # floats per block row: 1-8 AVX2 vectors of 8 lanes, 1-4 AVX-512 vectors of 16
_INDEX_TYPES = {np.dtype(np.uint8): "i8", np.dtype(np.uint16): "i16", np.dtype(np.uint32): "i32"}
PREFETCH_AHEAD = 256  # nonzeros ahead that the AVX2 matrix-vector kernel prefetches (1 KiB of values)
# the AVX-512 (gather) kernel's: 4 KiB of values; 512-1024 measured 4% faster than 256 on this project's Intel Xeon
# (9216x4096 at 9%, read after a dense layer), 2048 and none slower (none: 1.35x)
GATHER_PREFETCH_AHEAD = 1024

# Below these sizes one thread does it all: waking a sleeping worker costs ~50 us, more than it saves (measured on
# 2 cores with the first, Python pool, whose threads slept the same way: a 300x784 layer at 8% is faster serial up
# to batch 32, a 4096x4096 one at 9% parallel from batch 1). Batched products from 1M multiply-adds run parallel
# (4M until 2026-12-03): LeNet-300-100's fc1 at batch 64 (1.2M) on both threads of torch's OpenMP team made the
# whole sparse retraining step 0.80-0.83x the dense one against 0.89x serial, SGD-momentum, interleaved on this
# project's Intel Xeon (docs/training.md); serial, the team's other thread idles and torch's next op waits for it.
PARALLEL_MIN_WORK = 1 << 20  # multiply-adds of a batched product (nonzeros x columns)
PARALLEL_MIN_NONZEROS = 1 << 19  # nonzeros of a matrix-vector product (batch 1)

# The AVX-512 batch-1 product reads 1-byte column deltas where every gap fits (five bytes a nonzero, not six). On
# this project's Intel Xeon (2 threads, a 9216x4096 layer at 9%, 256 MB copied before each call so that the layer
# is read from memory): the bare product 12% faster than over uint16 columns (0.64-0.67 against 0.73-0.77 ms, min
# of 30); through SparseLinear, after the dense layer and two such copies, medians of 80 alternating calls 4-8%
# faster (0.85 against 0.89-0.92 ms), minima within noise; in cache equal within 5%.
DELTA_MATVEC = True
L1_TILES_MIN_FRACTION = 0.25  # the row-major batched products walk L1-sized input tiles only where a chunk's input
# block is larger than this fraction of L2 (CSRProduct._row_major_tiles; benchmarks/training.py --tiles sets it to 0
# for its comparison)
_UNSET = object()


def _unroll(vectors: int, lanes: int) -> int:
    """Accumulator sets: 8 vectors x 2 sets would not fit AVX2's 16 registers; AVX-512 has 32, and two FMA units of
    4 cycles' latency want 8 chains in flight (4 sets of 2 vectors for a 32-column block)."""
    if lanes == 16:
        return 4 if vectors <= 2 else 2
    return 2 if vectors <= 4 else 1


def _function_ir(width: int, index: str, lanes: int = 8, unroll: int | None = None, overwrite: bool = False,
                 bias: bool = False) -> str:
    """IR of one kernel over vectors of ``lanes`` floats (8: AVX2, 16: AVX-512); nonzeros taken ``unroll`` at a time
    into as many accumulator sets (more FMA chains). ``overwrite``: ``spmmw_*``, which writes the rows' sums instead
    of adding them to what ``out`` holds (no zeroing pass before it). ``bias`` (with ``overwrite``): ``spmmb_*``,
    which writes each row's sum plus ``bias[row]``, the bias's address passed as ``xstep`` (one block only: the
    block loop's x step is then never used), so a Linear layer's bias costs no pass of its own over the output."""
    if bias and not overwrite:
        raise ValueError("the bias kernel writes its rows: overwrite=True")
    lanes = min(lanes, width)
    _VEC = f"<{lanes} x float>"
    vectors = width // lanes
    unroll = unroll or _unroll(vectors, lanes)
    name = f"spmm{'b' if bias else 'w' if overwrite else ''}_{width}_{index}"
    lines = [f"define void @{name}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %vals, ptr noalias %x, i64 %ldx, ptr noalias %out, i64 %ldo, i64 %r0, i64 %r1, "
             "i64 %chunks, i64 %blocks, i64 %xstep, i64 %ostep) nounwind {",
             *blocked_rows_head(width)]
    for i in range(vectors):
        lines.append(f"  %op{i} = getelementptr float, ptr %orow, i64 {lanes * i}")
        if not overwrite:
            lines.append(f"  %init{i} = load {_VEC}, ptr %op{i}, align 4")
    if bias:  # every vector of the row starts from bias[o]
        lines += ["  %bptr = inttoptr i64 %xstep to ptr", "  %bp = getelementptr float, ptr %bptr, i64 %o",
                  "  %bv = load float, ptr %bp", f"  %bi = insertelement {_VEC} poison, float %bv, i32 0",
                  f"  %bb = shufflevector {_VEC} %bi, {_VEC} poison, <{lanes} x i32> zeroinitializer"]
    lines += ["  br label %loop", "loop:", "  %k = phi i64 [%s, %row], [%k.next, %body]"]
    for u in range(unroll):
        for i in range(vectors):
            start = "%bb" if u == 0 and bias else f"%init{i}" if u == 0 and not overwrite else "zeroinitializer"
            lines.append(f"  %acc{u}.{i} = phi {_VEC} [{start}, %row], [%new{u}.{i}, %body]")
    lines += [f"  %k.next = add nuw i64 %k, {unroll}", "  %more = icmp ule i64 %k.next, %e",
              "  br i1 %more, label %body, label %tail", "body:"]

    def nonzero(tag: str, k: str, acc: str, new: str) -> list[str]:
        out = [f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 {k}", f"  %cn{tag} = load {index}, ptr %cp{tag}",
               f"  %c{tag} = zext {index} %cn{tag} to i64", f"  %xoff{tag} = mul nuw i64 %c{tag}, %ldx",
               f"  %xr{tag} = getelementptr float, ptr %xc, i64 %xoff{tag}",
               f"  %vp{tag} = getelementptr float, ptr %vals, i64 {k}", f"  %v{tag} = load float, ptr %vp{tag}",
               f"  %vi{tag} = insertelement {_VEC} poison, float %v{tag}, i32 0",
               f"  %vb{tag} = shufflevector {_VEC} %vi{tag}, {_VEC} poison, <{lanes} x i32> zeroinitializer"]
        for i in range(vectors):
            out += [f"  %xp{tag}.{i} = getelementptr float, ptr %xr{tag}, i64 {lanes * i}",
                    f"  %xv{tag}.{i} = load {_VEC}, ptr %xp{tag}.{i}, align 4",
                    f"  %m{tag}.{i} = fmul contract {_VEC} %vb{tag}, %xv{tag}.{i}",
                    f"  {new}.{i} = fadd contract {_VEC} {acc}.{i}, %m{tag}.{i}"]
        return out

    for u in range(unroll):
        k = "%k" if u == 0 else f"%k{u}"
        if u:
            lines.append(f"  {k} = add nuw i64 %k, {u}")
        lines += nonzero(f"b{u}", k, f"%acc{u}", f"%new{u}")
    lines += ["  br label %loop", "tail:"]
    if unroll == 2:  # at most one nonzero left
        lines += ["  %left = icmp ult i64 %k, %e", "  br i1 %left, label %last, label %store", "last:"]
        lines += nonzero("t", "%k", "%acc0", "%fin")
        lines += ["  br label %store", "store:"]
        lines += [f"  %end{i} = phi {_VEC} [%acc0.{i}, %tail], [%fin.{i}, %last]" for i in range(vectors)]
        lines += [f"  %sum{i} = fadd {_VEC} %end{i}, %acc1.{i}" for i in range(vectors)]
        results = [f"%sum{i}" for i in range(vectors)]
    elif unroll > 2:  # up to unroll - 1 nonzeros left: one at a time into the first set
        lines += ["  br label %tl", "tl:", "  %kt = phi i64 [%k, %tail], [%kt.next, %tlbody]"]
        lines += [f"  %ta.{i} = phi {_VEC} [%acc0.{i}, %tail], [%tn.{i}, %tlbody]" for i in range(vectors)]
        lines += ["  %tleft = icmp ult i64 %kt, %e", "  br i1 %tleft, label %tlbody, label %store", "tlbody:"]
        lines += nonzero("t", "%kt", "%ta", "%tn")
        lines += ["  %kt.next = add nuw i64 %kt, 1", "  br label %tl", "store:"]
        for i in range(vectors):
            total = f"%ta.{i}"
            for u in range(1, unroll):
                lines.append(f"  %sum{u}.{i} = fadd {_VEC} {total}, %acc{u}.{i}")
                total = f"%sum{u}.{i}"
        results = [f"%sum{unroll - 1}.{i}" for i in range(vectors)]
    else:
        lines += ["  br label %store", "store:"]
        results = [f"%acc0.{i}" for i in range(vectors)]
    lines += [f"  store {_VEC} {r}, ptr %op{i}, align 4" for i, r in enumerate(results)]
    lines += blocked_rows_tail()
    return "\n".join(lines)


def blocked_rows_head(width: int, entry: tuple[str, ...] = ()) -> list[str]:
    """IR of a batched kernel's loops (the ``SPMM`` convention), from ``entry:`` (with ``entry``'s lines first) to
    the row's start: for each block b < blocks (x and out advance by xstep / ostep floats), each of ``chunks``
    column chunks of ``width`` floats (``%xc``, ``%oc``) and each row r0 <= ``%o`` < r1, the row's bounds ``%s`` and
    ``%e`` and its output ``%orow``; the body ends in a ``store:`` block that :func:`blocked_rows_tail` follows."""
    return ["entry:", *entry, "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %block, label %exit",
            "block:", "  %b = phi i64 [0, %entry], [%b.next, %block.end]",
            "  %xboff = mul nuw i64 %b, %xstep", "  %xb = getelementptr float, ptr %x, i64 %xboff",
            "  %oboff = mul nuw i64 %b, %ostep", "  %ob = getelementptr float, ptr %out, i64 %oboff",
            "  br label %chunk",
            "chunk:", "  %ch = phi i64 [0, %block], [%ch.next, %chunk.end]",
            f"  %choff = mul nuw i64 %ch, {width}", "  %xc = getelementptr float, ptr %xb, i64 %choff",
            "  %oc = getelementptr float, ptr %ob, i64 %choff", "  br label %row",
            "row:", "  %o = phi i64 [%r0, %chunk], [%o.next, %store]",
            "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
            "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
            "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64",
            "  %ooff = mul nuw i64 %o, %ldo", "  %orow = getelementptr float, ptr %oc, i64 %ooff"]


def blocked_rows_tail() -> list[str]:
    """IR closing :func:`blocked_rows_head`'s loops after the row's stores."""
    return ["  %o.next = add nuw i64 %o, 1", "  %rows.left = icmp ult i64 %o.next, %r1",
            "  br i1 %rows.left, label %row, label %chunk.end",
            "chunk.end:", "  %ch.next = add nuw i64 %ch, 1", "  %chunks.left = icmp ult i64 %ch.next, %chunks",
            "  br i1 %chunks.left, label %chunk, label %block.end",
            "block.end:", "  %b.next = add nuw i64 %b, 1", "  %blocks.left = icmp ult i64 %b.next, %blocks",
            "  br i1 %blocks.left, label %block, label %exit", "exit:", "  ret void", "}"]


def _gather_ir() -> str:
    """IR of ``gather_values(src, perm, dst, k0, _, k1, _ x 8)``: ``dst[k] = src[perm[k]]`` for k0 <= k < k1 (float32
    values, int64 positions), in the pool's SPMM calling convention with every address absolute (the runner's x and
    out arguments, 4 and 6, unused): a transposed product's values gathered from the weight's by its own tasks."""
    params = ", ".join(["i64 %src", "i64 %perm", "i64 %dst", "i64 %k0", "i64 %unused4", "i64 %k1"]
                       + [f"i64 %unused{j}" for j in range(6, 14)])
    return "\n".join([
        f"define void @gather_values({params}) nounwind {{", "entry:", "  %s = inttoptr i64 %src to ptr",
        "  %p = inttoptr i64 %perm to ptr", "  %d = inttoptr i64 %dst to ptr", "  %any = icmp ult i64 %k0, %k1",
        "  br i1 %any, label %loop, label %exit",
        "loop:", "  %k = phi i64 [%k0, %entry], [%k.next, %loop]", "  %pp = getelementptr i64, ptr %p, i64 %k",
        "  %i = load i64, ptr %pp", "  %sp = getelementptr float, ptr %s, i64 %i", "  %v = load float, ptr %sp",
        "  %dp = getelementptr float, ptr %d, i64 %k", "  store float %v, ptr %dp", "  %k.next = add nuw i64 %k, 1",
        "  %more = icmp ult i64 %k.next, %k1", "  br i1 %more, label %loop, label %exit",
        "exit:", "  ret void", "}"])


def _matvec_ir(index: str) -> str:
    """IR of ``out[o] += sum_k vals[k] * x[cols[k]]`` (batch 1).

    Four nonzeros at a time: one load of four column indices, one of four values, four scalar loads of x inserted
    into a vector, one vector multiply-add; two such groups per pass into two accumulators. Half the loads of a
    scalar loop (measured 1.2x faster; AVX2 gathers and software prefetch were no faster than scalar)."""
    groups, vec = 2, "<4 x float>"
    lines = [f"define void @spmv_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %vals, ptr noalias %x, ptr noalias %out, i64 %r0, i64 %r1, ptr %from) nounwind {",
             "entry:", "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
             "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %store]",
             "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
             "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
             "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64", *spmv_row_start_ir(),
             "  br label %loop", "loop:", "  %k = phi i64 [%s, %row], [%k.next, %body]"]
    lines += [f"  %acc{g} = phi {vec} [zeroinitializer, %row], [%new{g}, %body]" for g in range(groups)]
    lines += [f"  %k.next = add nuw i64 %k, {4 * groups}", "  %more = icmp ule i64 %k.next, %e",
              "  br i1 %more, label %body, label %rest", "body:",
              # ahead of the hardware prefetcher, which stops at each 4 KiB page: ~8% faster on a layer read cold
              # from memory (9216x4096 at 9%, after a dense layer evicted the cache)
              f"  %pk = add i64 %k, {PREFETCH_AHEAD}", "  %pfv = getelementptr float, ptr %vals, i64 %pk",
              "  call void @llvm.prefetch.p0(ptr %pfv, i32 0, i32 3, i32 1)",
              f"  %pfc = getelementptr {index}, ptr %cols, i64 %pk",
              "  call void @llvm.prefetch.p0(ptr %pfc, i32 0, i32 3, i32 1)"]
    for g in range(groups):
        k = "%k" if g == 0 else f"%k{g}"
        if g:
            lines.append(f"  {k} = add nuw i64 %k, {4 * g}")
        lines += [f"  %cp{g} = getelementptr {index}, ptr %cols, i64 {k}",
                  f"  %cv{g} = load <4 x {index}>, ptr %cp{g}, align 1",
                  f"  %ci{g} = zext <4 x {index}> %cv{g} to <4 x i64>"]
        gathered = "poison"
        for j in range(4):
            lines += [f"  %c{g}.{j} = extractelement <4 x i64> %ci{g}, i32 {j}",
                      f"  %xp{g}.{j} = getelementptr float, ptr %x, i64 %c{g}.{j}",
                      f"  %x{g}.{j} = load float, ptr %xp{g}.{j}",
                      f"  %xv{g}.{j} = insertelement {vec} {gathered}, float %x{g}.{j}, i32 {j}"]
            gathered = f"%xv{g}.{j}"
        lines += [f"  %vp{g} = getelementptr float, ptr %vals, i64 {k}",
                  f"  %vv{g} = load {vec}, ptr %vp{g}, align 4", f"  %m{g} = fmul contract {vec} %vv{g}, {gathered}",
                  f"  %new{g} = fadd contract {vec} %acc{g}, %m{g}"]
    lines += ["  br label %loop", "rest:", f"  %both = fadd {vec} %acc0, %acc1",
              f"  %sum = call reassoc float @llvm.vector.reduce.fadd.v4f32(float %init, {vec} %both)",
              "  br label %tail",
              "tail:", "  %kt = phi i64 [%k, %rest], [%kt.next, %tailbody]",
              "  %t = phi float [%sum, %rest], [%t.next, %tailbody]", "  %left = icmp ult i64 %kt, %e",
              "  br i1 %left, label %tailbody, label %store", "tailbody:",
              f"  %cpt = getelementptr {index}, ptr %cols, i64 %kt", f"  %cnt = load {index}, ptr %cpt",
              f"  %ct = zext {index} %cnt to i64", "  %xpt = getelementptr float, ptr %x, i64 %ct",
              "  %xvt = load float, ptr %xpt", "  %vpt = getelementptr float, ptr %vals, i64 %kt",
              "  %vt = load float, ptr %vpt", "  %mt = fmul contract float %vt, %xvt",
              "  %t.next = fadd contract float %t, %mt", "  %kt.next = add nuw i64 %kt, 1", "  br label %tail",
              "store:", "  store float %t, ptr %outp", "  %o.next = add nuw i64 %o, 1",
              "  %rows.left = icmp ult i64 %o.next, %r1", "  br i1 %rows.left, label %row, label %exit",
              "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _prefix_sum_ir(src: str, tag: str) -> tuple[list[str], str]:
    """IR of the inclusive prefix sum of a <16 x i32> (four shift-and-add steps); returns (lines, result)."""
    lines, cur = [], src
    for n in (1, 2, 4, 8):
        shift = ", ".join(f"i32 {i - n}" if i >= n else "i32 16" for i in range(16))  # lanes up by n, zeros in
        lines += [f"  %sh{tag}{n} = shufflevector <16 x i32> {cur}, <16 x i32> zeroinitializer, <16 x i32> <{shift}>",
                  f"  %ps{tag}{n} = add <16 x i32> {cur}, %sh{tag}{n}"]
        cur = f"%ps{tag}{n}"
    return lines, cur


def _matvec_gather_ir(index: str) -> str:
    """IR of the batch-1 product of the AVX-512 build: sixteen column indices widened to i32, one gather of x,
    one load of values and one multiply-add per sixteen nonzeros; the last up to fifteen of a row by masked loads
    and a masked gather (nothing is read past the row). One accumulator: the gathers, not the multiply-add chain,
    set the pace (two or four accumulators measured no faster).

    ``index`` "delta" builds ``spmv_delta``: the columns come as 1-byte gaps from the row's previous nonzero (0 for
    its first) and ``info`` holds (start, end, first column) per row; per sixteen nonzeros one 16-byte load, a
    prefix sum (four shuffles and adds) plus the running column. Five bytes a nonzero instead of six (uint16
    columns): the product is read from memory when other layers have evicted it."""
    delta = index == "delta"
    vec, i32 = "<16 x float>", "<16 x i32>"
    elem = "i8" if delta else index
    ind = f"<16 x {elem}>"
    gather = f"call {vec} @llvm.masked.gather.v16f32.v16p0"
    lanes = ", ".join(f"i32 {i}" for i in range(16))

    def columns(out: str, loaded: str, tag: str) -> list[str]:
        """The sixteen columns ``out`` from the loaded indices (absolute: widened; delta: summed onto the carry)."""
        if not delta:
            op = "bitcast" if index == "i32" else "zext"
            return [f"  {out} = {op} {ind} {loaded} to {i32}"]
        lines, summed = _prefix_sum_ir(f"%d{tag}", tag)
        return [f"  %d{tag} = zext {ind} {loaded} to {i32}", *lines, f"  {out} = add {i32} {summed}, %carry"]

    if delta:
        params, data = "ptr noalias %info, ptr noalias %unused, ptr noalias %deltas", "%deltas"
        bounds = ["  %o3 = mul i64 %o, 3", "  %sp = getelementptr i32, ptr %info, i64 %o3",
                  "  %s32 = load i32, ptr %sp", "  %ep = getelementptr i32, ptr %sp, i64 1",
                  "  %e32 = load i32, ptr %ep", "  %bp = getelementptr i32, ptr %sp, i64 2",
                  "  %b32 = load i32, ptr %bp"]
        base = [f"  %b0 = insertelement {i32} poison, i32 %b32, i32 0",
                f"  %base = shufflevector {i32} %b0, {i32} poison, <16 x i32> zeroinitializer"]
        carry = [f"  %carry = phi {i32} [%base, %row], [%carry.next, %body]"]
        carry_next = [f"  %carry.next = shufflevector {i32} %ci, {i32} poison, <16 x i32> <"
                      + ", ".join("i32 15" for _ in range(16)) + ">"]
    else:
        params, data = "ptr noalias %starts, ptr noalias %ends, ptr noalias %cols", "%cols"
        bounds = ["  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
                  "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep"]
        base, carry, carry_next = [], [], []
    return "\n".join([
        f"define void @spmv_{index}({params}, "
        "ptr noalias %vals, ptr noalias %x, ptr noalias %out, i64 %r0, i64 %r1, ptr %from) nounwind {",
        "entry:", "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
        "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %store]", *bounds,
        "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64", *base, *spmv_row_start_ir(),
        "  br label %loop",
        "loop:", "  %k = phi i64 [%s, %row], [%k.next, %body]",
        f"  %acc = phi {vec} [zeroinitializer, %row], [%new, %body]", *carry,
        "  %k.next = add nuw i64 %k, 16", "  %more = icmp ule i64 %k.next, %e",
        "  br i1 %more, label %body, label %rest",
        "body:", f"  %pk = add i64 %k, {GATHER_PREFETCH_AHEAD}", "  %pfv = getelementptr float, ptr %vals, i64 %pk",
        "  call void @llvm.prefetch.p0(ptr %pfv, i32 0, i32 3, i32 1)",
        f"  %pfc = getelementptr {elem}, ptr {data}, i64 %pk",
        "  call void @llvm.prefetch.p0(ptr %pfc, i32 0, i32 3, i32 1)",
        f"  %cp = getelementptr {elem}, ptr {data}, i64 %k", f"  %cv = load {ind}, ptr %cp, align 1",
        *columns("%ci", "%cv", "b"), *carry_next, f"  %xp = getelementptr float, ptr %x, {i32} %ci",
        f"  %xg = {gather}(<16 x ptr> %xp, i32 4, <16 x i1> splat (i1 true), {vec} poison)",
        "  %vp = getelementptr float, ptr %vals, i64 %k", f"  %vv = load {vec}, ptr %vp, align 4",
        f"  %new = call {vec} @llvm.fma.v16f32({vec} %vv, {vec} %xg, {vec} %acc)", "  br label %loop",
        "rest:", "  %left = icmp ult i64 %k, %e", "  br i1 %left, label %tail, label %sum",
        "tail:", "  %n = sub i64 %e, %k", "  %n32 = trunc i64 %n to i32",
        f"  %nv0 = insertelement {i32} poison, i32 %n32, i32 0",
        f"  %nv = shufflevector {i32} %nv0, {i32} poison, <16 x i32> zeroinitializer",
        f"  %m = icmp ult {i32} <{lanes}>, %nv",
        f"  %cpt = getelementptr {elem}, ptr {data}, i64 %k",
        f"  %cvt = call {ind} @llvm.masked.load.v16{elem}.p0(ptr %cpt, i32 1, <16 x i1> %m, {ind} zeroinitializer)",
        *columns("%cit", "%cvt", "t"), f"  %xpt = getelementptr float, ptr %x, {i32} %cit",
        f"  %xgt = {gather}(<16 x ptr> %xpt, i32 4, <16 x i1> %m, {vec} zeroinitializer)",
        "  %vpt = getelementptr float, ptr %vals, i64 %k",
        f"  %vvt = call {vec} @llvm.masked.load.v16f32.p0(ptr %vpt, i32 4, <16 x i1> %m, {vec} zeroinitializer)",
        f"  %last = call {vec} @llvm.fma.v16f32({vec} %vvt, {vec} %xgt, {vec} %acc)", "  br label %sum",
        *gather_row_end()])


def gather_row_end() -> list[str]:
    """IR ending a 16-lane batch-1 kernel's row and its row loop: ``%acc`` (from ``rest:``) or ``%last`` (from
    ``tail:``) summed onto ``%init`` and stored at ``%outp``."""
    vec = "<16 x float>"
    return ["sum:", f"  %fin = phi {vec} [%acc, %rest], [%last, %tail]",
            f"  %total = call reassoc float @llvm.vector.reduce.fadd.v16f32(float %init, {vec} %fin)",
            "  br label %store",
            "store:", "  store float %total, ptr %outp", "  %o.next = add nuw i64 %o, 1",
            "  %rows.left = icmp ult i64 %o.next, %r1", "  br i1 %rows.left, label %row, label %exit",
            "exit:", "  ret void", "}"]


def delta_rows(row_starts: np.ndarray, row_ends: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The 1-byte delta form of a CSR matrix's columns for ``spmv_delta`` (:func:`_matvec_gather_ir`): ((rows, 3)
    int32 of start, end and first column per row, uint8 gaps), or None where a row's columns are not increasing or
    two neighbours lie more than 255 columns apart (such a matrix keeps its absolute columns)."""
    cols = cols.astype(np.int64)
    gaps = np.diff(cols, prepend=0)
    starts = row_starts.astype(np.int64)
    rows = row_ends > row_starts
    first = np.zeros(starts.size, np.int64)
    first[rows] = cols[starts[rows]]
    gaps[starts[rows]] = 0
    if gaps.size and (gaps.min() < 0 or gaps.max() > 255):
        return None
    return np.ascontiguousarray(np.stack([row_starts, row_ends, first], 1).astype(np.int32)), gaps.astype(np.uint8)


def _products_ir(lanes: int) -> str:
    """The module of one vector width: the batched kernels and the batch-1 kernel of that build."""
    vec = "<16 x float>"
    gather_decls = [f"declare {vec} @llvm.masked.gather.v16f32.v16p0(<16 x ptr>, i32, <16 x i1>, {vec})",
                    f"declare {vec} @llvm.fma.v16f32({vec}, {vec}, {vec})",
                    f"declare {vec} @llvm.masked.load.v16f32.p0(ptr, i32, <16 x i1>, {vec})",
                    f"declare float @llvm.vector.reduce.fadd.v16f32(float, {vec})"]
    gather_decls += [f"declare <16 x {t}> @llvm.masked.load.v16{t}.p0(ptr, i32, <16 x i1>, <16 x {t}>)"
                     for t in _INDEX_TYPES.values()]
    matvec = _matvec_gather_ir if lanes == 16 else _matvec_ir
    return "\n\n".join(
        ["declare float @llvm.vector.reduce.fadd.v4f32(float, <4 x float>)",
         "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
        + (gather_decls if lanes == 16 else [])
        + [_function_ir(w, t, lanes, overwrite=o, bias=b) for w in WIDTHS for t in _INDEX_TYPES.values()
           for o, b in ((False, False), (True, False), (True, True))]
        + [matvec(t) for t in _INDEX_TYPES.values()] + ([_matvec_gather_ir("delta")] if lanes == 16 else [])
        + [_gather_ir()])


def _addresses(engine) -> dict[tuple[int, str], int]:
    found = {(width, index): engine.get_function_address(f"spmm_{width}_{index}")
             for width in WIDTHS for index in _INDEX_TYPES.values()}
    found.update({(-width, index): engine.get_function_address(f"spmmw_{width}_{index}")
                  for width in WIDTHS for index in _INDEX_TYPES.values()})
    found.update({("bias", width, index): engine.get_function_address(f"spmmb_{width}_{index}")
                  for width in WIDTHS for index in _INDEX_TYPES.values()})
    found.update({(1, index): engine.get_function_address(f"spmv_{index}") for index in _INDEX_TYPES.values()})
    found[1, "delta"] = engine.get_function_address("spmv_delta")  # 0 in the AVX2 build
    found["gather"] = engine.get_function_address("gather_values")
    return found


def kernel(width: int, index_dtype: np.dtype | str, lanes: int | None = None, overwrite: bool = False,
           bias: bool = False) -> int:
    """Address of the compiled kernel for a block ``width`` (one of WIDTHS, or 1 for the matrix-vector product)
    and a column-index dtype (uint8/16/32, or ``"delta"``: the AVX-512 batch-1 kernel over 1-byte column deltas),
    over vectors of ``lanes`` floats (default: the host's widest, see
    :func:`.jit.vector_lanes`); ``overwrite``: the batched kernel that writes its sums instead of adding them to
    ``out``; ``bias`` (with ``overwrite``): the one that writes its sums plus a bias (address as ``xstep``, one
    block). The products compile on first use (~0.6 s)."""
    lanes = lanes or vector_lanes()
    if lanes not in (8, 16):
        raise ValueError(f"lanes must be 8 (AVX2) or 16 (AVX-512), got {lanes}")
    if overwrite and width == 1:
        raise ValueError("the matrix-vector kernel only adds into out")
    if bias and (not overwrite or width == 1):
        raise ValueError("the bias kernel is a batched kernel that writes its rows: overwrite=True, width > 1")
    delta = isinstance(index_dtype, str) and index_dtype == "delta"
    if delta and (width != 1 or lanes != 16):
        raise ValueError("the delta-column kernel is the AVX-512 (16 lanes) batch-1 product only")
    found = _compiled_products(lanes)
    index = "delta" if delta else _INDEX_TYPES[np.dtype(index_dtype)]
    return found["bias", width, index] if bias else found[-width if overwrite else width, index]


def kernel_gather(lanes: int | None = None) -> int:
    """Address of ``gather_values`` (see :func:`_gather_ir`), compiled with the products."""
    return _compiled_products(lanes or vector_lanes())["gather"]


def _compiled_products(lanes: int) -> dict:
    """The products module's function addresses for vectors of ``lanes`` floats, compiled on first use."""
    return compiled(f"csr{lanes}", lambda: _products_ir(lanes), _addresses)


def row_splits(indptr: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous row ranges with about equal nonzeros each."""
    n_rows = indptr.shape[0] - 1
    cuts = [0] + [int(np.searchsorted(indptr, indptr[-1] * i / parts)) for i in range(1, parts)] + [n_rows]
    cuts = sorted(min(max(c, 0), n_rows) for c in cuts)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def block_width() -> int:
    """Batch columns per block of the batched products: 64 (four 16-lane vectors) on AVX-512, 32 on AVX2."""
    return 64 if vector_lanes() == 16 else 32


def default_tile_rows() -> int:
    """Input rows per tile of the row-major layout: half of L2 holds a tile of the input block (2048 rows of 32 floats
    in a 512 KiB L2; 4096 rows of 64 floats in the 2 MiB L2 of this project's Intel Xeon, where 2048 measured
    1.2-1.3x slower)."""
    return max(l2_cache_bytes() // (2 * 4 * block_width()), 256)


def major_tile_rows(width: int) -> int:
    """Input rows per tile of the tile-major layout for chunks of ``width`` columns, measured on this project's Intel
    Xeon (48 KiB L1d, 2 MiB L2; 9216x4096 at 9%, weights cold): 128 rows of 64 floats (32 KiB, in L1) at batch 256
    (1.38x the row-major product; 256 rows 1.06x), 512 rows of 32 floats at batch 32 (1.6x; 256 rows 1.39x)."""
    return 128 if width >= 64 else 512


def tile_pointers(indptr: np.ndarray, cols: np.ndarray, n_in: int, tile_rows: int) -> np.ndarray:
    """(tiles + 1, n_rows) int32: row o's nonzeros with a column in tile t are tiles[t, o]:tiles[t + 1, o].

    Walking the input tile by tile keeps the rows of x that the nonzeros gather from in L2 (measured 15-20% faster
    on 9216- and 25088-input layers at batch 256)."""
    n_rows = indptr.shape[0] - 1
    n_tiles = max(-(-n_in // tile_rows), 1)
    counts = np.zeros((n_rows, n_tiles), dtype=np.int64)
    if cols.size:
        rows = np.repeat(np.arange(n_rows), np.diff(indptr.astype(np.int64)))
        np.add.at(counts, (rows, cols.astype(np.int64) // tile_rows), 1)
    tiles = np.empty((n_tiles + 1, n_rows), dtype=np.int64)
    tiles[0] = indptr[:-1]
    tiles[1:] = indptr[:-1] + np.cumsum(counts, axis=1).T
    return np.ascontiguousarray(tiles.astype(np.int32))


def column_chunks(m: int, widest: int = 32) -> list[tuple[int, int, int]]:
    """(offset, width, count) runs of kernel-width chunks covering ``m`` columns (a multiple of 8), widest first."""
    runs, start = [], 0
    while start < m:
        width = max(w for w in WIDTHS if w <= min(widest, m - start))
        count = (m - start) // width
        runs.append((start, width, count))
        start += width * count
    return runs


def tap_offsets(taps: np.ndarray, kernel_size: tuple[int, int], padded: tuple[int, int]) -> np.ndarray:
    """Offsets ``c * Hp * Wp + i * Wp + j`` into one flat zero-padded image (Hp x Wp planes) of a convolution's
    taps given as flat ``c * kh * kw + i * kw + j`` (int64; ascending where ``taps`` is): the columns of a direct
    convolution (:meth:`CSRProduct.conv_rows`, :meth:`CSRProduct.flat_plan`)."""
    (kh, kw), (hp, wp) = kernel_size, padded
    channel, rest = np.divmod(taps.astype(np.int64), kh * kw)
    row, col = np.divmod(rest, kw)
    return channel * hp * wp + row * wp + col


def padded_images(source: np.ndarray, padding: tuple[int, int], tail: int) -> np.ndarray:
    """The (B, C, H, W) batch as flat zero-padded images followed by ``tail`` zeros (float32; the direct
    convolutions' vector loads run past the last image's largest offset)."""
    batch, channels, height, width = source.shape
    (ph, pw) = padding
    size = batch * channels * (height + 2 * ph) * (width + 2 * pw)
    flat = np.empty(size + tail, np.float32)
    flat[size:] = 0.0
    planes = flat[:size].reshape(batch, channels, height + 2 * ph, width + 2 * pw)
    if ph or pw:
        planes[:, :, :ph], planes[:, :, ph + height:] = 0.0, 0.0
        planes[:, :, ph:ph + height, :pw], planes[:, :, ph:ph + height, pw + width:] = 0.0, 0.0
    planes[:, :, ph:ph + height, pw:pw + width] = source
    return flat


class CSRProduct:
    """A CSR matrix ready for the kernels: row pointers split by input tile, narrow column indices, float32 values.

    Plans (records and tasks, see the module docstring) are cached per call shape with the input and output
    addresses left out; the compiled runner adds a call's addresses in. Pickling and copying keep only the arrays.
    """

    def __init__(self, indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_in: int,
                 tile_rows: int | None = None, lanes: int | None = None, tile_major: bool | None = None) -> None:
        if indptr.dtype != np.int32 or cols.dtype not in _INDEX_TYPES or vals.dtype != np.float32:
            raise ValueError(f"CSRProduct wants int32 row pointers, uint8/16/32 columns and float32 values, got "
                             f"{indptr.dtype}, {cols.dtype}, {vals.dtype}")
        self.n_in, self.lanes = n_in, lanes
        self.tile_major = (lanes or vector_lanes()) == 16 if tile_major is None else tile_major
        self.cols, self.vals = np.ascontiguousarray(cols), np.ascontiguousarray(vals)
        self.tiles = tile_pointers(indptr, self.cols, n_in, tile_rows or default_tile_rows())
        self.tiles_given = tile_rows is not None  # the caller's tiles serve every product
        self._prepare()

    def _prepare(self) -> None:
        self.cols, self.vals = huge_page_array(self.cols), huge_page_array(self.vals)
        self.n_rows = self.tiles.shape[1]
        self._bounds = [self.tiles[t].ctypes.data for t in range(self.tiles.shape[0])]
        self._data = (self.cols.ctypes.data, self.vals.ctypes.data)
        self._row_nnz_end = np.concatenate([self.tiles[0, :1], self.tiles[-1]]) if self.n_rows else None
        self._plans: dict[tuple, Plan] = {}
        self._reach = int(self.cols.max()) if self.cols.size else 0  # the largest column (conv_rows' bounds check)
        self._major: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}
        self._small_tiles: dict[int, np.ndarray] = {}
        self._delta: object = _UNSET

    def __getstate__(self) -> dict:
        return {"n_in": self.n_in, "lanes": self.lanes, "cols": self.cols, "vals": self.vals, "tiles": self.tiles,
                "tile_major": self.tile_major, "tiles_given": self.tiles_given}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"lanes": None, "tile_major": False, "tiles_given": True, **state})
        self._prepare()

    def rebind_values(self, vals: np.ndarray) -> None:
        """Read the nonzeros' values from ``vals`` from now on (contiguous float32 of the same length, e.g. the
        storage of a parameter that an optimizer updates in place); cached plans are dropped."""
        if vals.shape != self.vals.shape or vals.dtype != np.float32 or not vals.flags.c_contiguous:
            raise ValueError(f"rebind_values wants contiguous float32 values of shape {self.vals.shape}, got "
                             f"{vals.dtype} {vals.shape}")
        self.vals = vals
        self._data = (self.cols.ctypes.data, self.vals.ctypes.data)
        self._plans = {}
        self._major, self.tile_major = {}, False  # values updated in place from now on: row-major only

    def values_changed(self) -> None:
        """Say that ``vals`` was written in place: the tile-major copies of the batched products are dropped (they
        are rebuilt from ``vals`` on the next batched call)."""
        self._major = {}
        self._plans = {key: plan for key, plan in self._plans.items() if key[0] != "matmul"}

    def _tile_major(self, tile_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(row pointers, columns, values, tiles) of the nonzeros ordered by input tile, then row: tile t's row o is
        ``ptr[t * n_rows + o]:ptr[t * n_rows + o + 1]``. A tile's pass over all rows then streams its nonzeros in
        order; in row-major order with small tiles each row's few nonzeros in a tile lie a row apart and a cold
        weight is read as scattered pieces (1.4x slower at batch 256 on a 9216x4096 layer than row-major with
        L2-sized tiles)."""
        found = self._major.get(tile_rows)
        if found is None:
            n_tiles = max(-(-self.n_in // tile_rows), 1)
            counts = np.diff(self._row_nnz_end.astype(np.int64)) if self.n_rows else np.zeros(0, np.int64)
            rows = np.repeat(np.arange(self.n_rows, dtype=np.int64), counts)
            key = self.cols.astype(np.int64) // tile_rows * self.n_rows + rows
            order = np.argsort(key, kind="stable")
            ptr = np.zeros(n_tiles * self.n_rows + 1, dtype=np.int64)
            ptr[1:] = np.cumsum(np.bincount(key, minlength=n_tiles * self.n_rows))
            found = (ptr.astype(np.int32), huge_page_array(self.cols[order]), huge_page_array(self.vals[order]),
                     n_tiles)
            self._major[tile_rows] = found
        return found

    def _row_major_tiles(self, width: int) -> np.ndarray:
        """The tile pointers of the row-major batched products for chunks of ``width`` columns: this product's own
        (:func:`default_tile_rows`, L2-sized) on AVX2 or where the caller chose them, else (AVX-512, values kept
        row-major: sparse compute steps them in place) the tile-major layout's L1-sized tiles
        (:func:`major_tile_rows`) over the row-major values. Measured on this project's Intel Xeon, one thread
        (2 for the big layer): LeNet-300-100's fc1 (300x784 at 8%, batch 64) 69 -> 46 us, a 9216x4096 layer at
        9% 7.2 -> 4.5 ms at batch 64 and 32 -> 26 ms at batch 256, at batch 16 (512 rows) 2.9 -> 2.0-2.5 ms.
        Not measured on AVX2 hosts, so not used there. Nor where one chunk's input block fits in a quarter of L2
        (:data:`L1_TILES_MIN_FRACTION`): there the L1 tiles cut each row into several short runs, and whole
        LeNet-300-100 sparse-compute steps (fc1 784 x 64 floats, 200 KiB) ran 2.5-3% faster with one tile
        (SGD-momentum and Adam, 1 and 2 threads, interleaved, this Xeon, 2026-12-07) although the product alone was
        faster with L1 tiles. Larger blocks keep them: the GPT-2-width step (3072-input layers, 512 tokens) ran
        0.49x the masked step with them against 0.53x without (two runs each); the AlexNet MLP's steps, though, ran
        1-11% slower with them on 2026-12-07 (an open question: 0.96-0.98x on 2026-12-03)."""
        if self.tiles_given or (self.lanes or vector_lanes()) != 16 or self.n_rows == 0 \
                or 4 * width * self.n_in <= l2_cache_bytes() * L1_TILES_MIN_FRACTION:
            return self.tiles
        tile_rows = major_tile_rows(width)
        found = self._small_tiles.get(tile_rows)
        if found is None:
            found = self._small_tiles[tile_rows] = tile_pointers(self._row_nnz_end, self.cols, self.n_in, tile_rows)
        return found

    def _ranges(self, parts: int) -> list[tuple[int, int]]:
        if parts <= 1:
            return [(0, self.n_rows)] if self.n_rows else []
        return row_splits(self._row_nnz_end, parts)

    def _image_tasks(self, batches: int, threads: int, calls) -> list[list[list[int]]]:
        """Tasks of a product over a batch of images, ``calls(first image, images, (r0, r1))`` giving a task's
        records: with at least two images a thread, runs of images (each image read by one task), else ranges of
        rows over all the images."""
        if threads > 1 and batches >= 2 * threads:
            cuts = np.linspace(0, batches, min(batches, threads * CHUNKS_PER_THREAD) + 1).astype(int)
            return [calls(a, b - a, (0, self.n_rows)) for a, b in itertools.pairwise(cuts) if b > a]
        return [calls(0, batches, rows) for rows in self._ranges(threads * CHUNKS_PER_THREAD)]

    def _plan(self, key: tuple, threads: int, per_task: list[list[list[int]]], keep: object = None) -> Plan:
        """A cached plan holding ``keep`` (default: the row-major arrays), what its records point into, alive while
        it runs, whatever rebind_values or values_changed drop meanwhile."""
        if len(self._plans) >= 16:  # a model sees few shapes; do not grow without bound on varying ones
            self._plans.clear()
        plan = self._plans[key] = Plan(per_task, threads)
        plan.keep = (self.cols, self.vals, self.tiles) if keep is None else keep
        return plan

    def matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        """out += W @ x for x (n_in,) and out (n_rows,) contiguous float32. The vector stays in cache: untiled."""
        if x.shape != (self.n_in,) or out.shape != (self.n_rows,) or x.dtype != np.float32 \
                or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"matvec wants contiguous float32 x ({self.n_in},) and out ({self.n_rows},), got "
                             f"{x.dtype} {x.shape} and {out.dtype} {out.shape}")
        self.matvec_at(x.ctypes.data, out, threads)

    def matvec_at(self, x_address: int, out: np.ndarray, threads: int, bias_address: int = 0) -> None:
        """:meth:`matvec` with x given by the address of n_in contiguous float32 (the caller vouches for it); with a
        ``bias_address`` (of n_rows float32), ``out = bias + W @ x`` instead (out's contents are not read)."""
        if out.shape != (self.n_rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"matvec wants a contiguous float32 out ({self.n_rows},), got {out.dtype} {out.shape}")
        self.matvec_plan(threads).run(x_address, out.ctypes.data, bias_address)

    def matvec_plan(self, threads: int) -> Plan:
        """The cached batch-1 plan on up to ``threads`` threads: ``plan.run(x, out, bias)`` with the addresses of x
        (n_in float32), out (n_rows float32) and a bias (n_rows float32: out = bias + W x) or 0 (out += W x). Its
        arrays stay alive with it; a caller keeping it follows :meth:`rebind_values` by asking again."""
        threads = threads if self.vals.size >= PARALLEL_MIN_NONZEROS else 1
        plan = self._plans.get(("matvec", threads))
        if plan is None:
            ranges = self._ranges(threads * CHUNKS_PER_THREAD)
            delta = self.delta_form()
            if delta is not None:
                info, gaps = delta
                fn = kernel(1, "delta", self.lanes)
                plan = self._plan(("matvec", threads), threads,
                                  [[[SPMV, fn, info.ctypes.data, 0, gaps.ctypes.data, self.vals.ctypes.data, 0, 0,
                                     *rows] + [0] * 6] for rows in ranges], keep=(info, gaps, self.vals))
            else:
                fn = kernel(1, self.cols.dtype, self.lanes)
                starts, ends = self._bounds[0], self._bounds[-1]
                plan = self._plan(("matvec", threads), threads,
                                  [[[SPMV, fn, starts, ends, *self._data, 0, 0, *rows] + [0] * 6] for rows in ranges])
        return plan

    def delta_form(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The 1-byte column deltas the AVX-512 batch-1 product reads (:func:`delta_rows`), built on first use and
        kept (one byte a nonzero more in memory); None where that kernel reads the absolute columns: AVX2 builds,
        uint8 columns (as small already), gaps over 255 columns, or ``DELTA_MATVEC`` off."""
        if self._delta is _UNSET:
            use = DELTA_MATVEC and (self.lanes or vector_lanes()) == 16 and self.cols.dtype != np.uint8 \
                and self.n_rows > 0
            found = delta_rows(self.tiles[0], self.tiles[-1], self.cols) if use else None
            self._delta = None if found is None else (found[0], huge_page_array(found[1]))
        return self._delta

    def matmul(self, x: np.ndarray, out: np.ndarray, threads: int, widest: int | None = None) -> None:
        """out[b] += W @ x[b] for every b: x (B, n_in, m) and out (B, n_rows, m) C-contiguous float32, m a
        multiple of 8. A task is a range of rows; its records walk the input tiles and, per tile and chunk width,
        all blocks and column chunks of those rows."""
        batches, n_in, m = x.shape
        if m % 8 or n_in != self.n_in or out.shape != (batches, self.n_rows, m) or x.dtype != np.float32 \
                or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"matmul wants C-contiguous float32 x (B, {self.n_in}, m) and out (B, {self.n_rows}, m) "
                             f"with m a multiple of 8, got {x.dtype} {x.shape} and {out.dtype} {out.shape}")
        if m == 0 or batches == 0:
            return
        self.matmul_plan(batches, m, threads, widest).run(x.ctypes.data, out.ctypes.data)

    def matmul_plan(self, batches: int, m: int, threads: int, widest: int | None = None, ld: int | None = None,
                    overwrite: bool = False, bias_address: int = 0, gather: tuple[int, int] | None = None) -> Plan:
        """The plan of :meth:`matmul` for C-contiguous x (batches, n_in, ld) and out (batches, n_rows, ld) of which
        the first m > 0 columns (a multiple of 8) count (``ld`` defaults to m): ``plan.run(x_address, out_address)``
        runs it (the caller vouches for the arrays; sparse compute calls it directly, a layer's checks done once).
        ``overwrite``: the product is written into out's m columns (whatever they held) instead of added to them:
        the first input tile's calls write every row, the later ones add. ``bias_address`` (with ``overwrite``,
        one block): the address of n_rows float32 added to every column of their rows by those first calls (the
        plan reads them at each run: a bias stepped in place needs no new plan). ``gather`` = (src, perm) addresses:
        each task first writes its rows' values, ``vals[k] = src[perm[k]]`` (float32 src, int64 perm; a transposed
        product's values taken from the weight's at each run, by the threads that then read them), row-major values
        only."""
        if bias_address and not (overwrite and batches == 1):
            raise ValueError("a bias is written by an overwriting plan of one block: overwrite=True, batches=1")
        if gather is not None and self.tile_major:
            raise ValueError("gathered values need the row-major layout (tile_major=False)")
        threads = threads if self.vals.size * batches * m >= PARALLEL_MIN_WORK else 1
        widest = widest or block_width()
        ld = ld or m
        x_step, o_step = self.n_in * ld, self.n_rows * ld
        key = ("matmul", threads, batches, m, widest, ld, overwrite, bias_address, gather)
        plan = self._plans.get(key)
        if plan is None:
            chunks = column_chunks(m, widest)
            runs = [(offset * 4, count, kernel(width, self.cols.dtype, self.lanes)) for offset, width, count in chunks]
            first = [(offset * 4, count, kernel(width, self.cols.dtype, self.lanes, overwrite, bool(bias_address)))
                     for offset, width, count in chunks]
            first_step = bias_address or x_step  # the bias kernel reads its bias's address where x's step goes
            data = self._data
            keep = None
            if self.tile_major and self.vals.size:  # AVX-512: small tiles, their nonzeros in order (tile-major)
                keep = self._tile_major(major_tile_rows(min(widest, m)))
                ptr, cols, vals, n_tiles = keep
                data = (cols.ctypes.data, vals.ctypes.data)
                pairs = [(ptr.ctypes.data + 4 * t * self.n_rows, ptr.ctypes.data + 4 * t * self.n_rows + 4)
                         for t in range(n_tiles)]
            else:
                tiles = self._row_major_tiles(min(widest, m))
                keep = (self.cols, self.vals, tiles)
                pairs = list(itertools.pairwise(tiles[t].ctypes.data for t in range(tiles.shape[0])))
            # each task reads all of x again: as many tasks as keep that below the bytes of the weight, so late
            # threads can still be balanced where x is small (batch 32) and x is not re-read where it is large
            weight_bytes = self.vals.nbytes + self.cols.nbytes
            x_bytes = 4 * batches * self.n_in * ld
            parts = threads * max(min(CHUNKS_PER_THREAD, weight_bytes // max(x_bytes * threads, 1)), 1)

            def task(r0: int, r1: int) -> list[list[int]]:
                records = [[SPMM, kernel_gather(self.lanes), *gather, self.vals.ctypes.data,
                            int(self._row_nnz_end[r0]), 0, int(self._row_nnz_end[r1])] + [0] * 8] if gather else []
                return records + [[SPMM, fn, starts, ends, *data, offset, ld, offset, ld, r0, r1, count, batches,
                                   x_step if t else first_step, o_step]
                                  for t, (starts, ends) in enumerate(pairs)
                                  for offset, count, fn in (runs if t else first)]

            plan = self._plan(key, threads, [task(*rows) for rows in self._ranges(parts)], keep)
        return plan

    def flat_plan(self, batches: int, m: int, threads: int) -> Plan:
        """The plan of ``out[b, o, :m] += sum_k vals[k] * x[b * n_in + cols[k] : ... + m]`` for every image b: the
        columns are offsets into one flat image of ``n_in`` floats, ``x`` the batch of such images followed by a
        tail reaching m floats past the largest offset, ``out`` (batches, n_rows, m) C-contiguous, m > 0 a multiple
        of 8: ``plan.run(x_address, out_address)`` (the caller vouches for the arrays). A stride-1 convolution over
        zero-padded images is this product with the offsets ``c * Hp * Wp + i * Wp + j`` of its kept taps (its
        output rows ``Wp`` floats apart, the last ``kw - 1`` of each discarded). With at least two images a thread,
        a task is a run of images (each image read by one task), otherwise a range of rows."""
        threads = threads if self.vals.size * batches * m >= PARALLEL_MIN_WORK else 1
        key = ("flat", threads, batches, m)
        plan = self._plans.get(key)
        if plan is None:
            runs = [(offset * 4, count, kernel(width, self.cols.dtype, self.lanes))
                    for offset, width, count in column_chunks(m, 64)]
            starts, ends, data = self._bounds[0], self._bounds[-1], self._data
            o_step = self.n_rows * m

            def calls(first: int, images: int, rows: tuple[int, int]) -> list[list[int]]:
                return [[SPMM, fn, starts, ends, *data, 4 * first * self.n_in + offset, 1,
                         4 * first * o_step + offset, m, *rows, count, images, self.n_in, o_step]
                        for offset, count, fn in runs]

            plan = self._plan(key, threads, self._image_tasks(batches, threads, calls))
        return plan

    def conv_rows(self, x: np.ndarray, out: np.ndarray, out_h: int, row_step: int, threads: int) -> None:
        """Direct convolution at stride 1 without im2col. The columns of this product are offsets into one image
        of the padded input (c * Hp * Wp + kh * Wp + kw) and ``x`` is the flat padded batch, B images of
        ``n_in`` floats plus a tail of at least w8 floats; ``out`` is (B, n_rows, out_h, w8) with w8 the output
        width rounded up to 8. For every image, output row oh and nonzero k:
        ``out[b, o, oh, :] += vals[k] * x[b * n_in + oh * row_step + cols[k] : ... + w8]`` (lanes past the true
        output width read neighbouring input and are discarded by the caller). With more images than threads a
        task is a run of images (each image's input read once), otherwise a range of output channels."""
        batches, n_rows, rows, w8 = out.shape
        if rows != out_h or n_rows != self.n_rows or w8 % 8 or out.dtype != np.float32 or x.dtype != np.float32 \
                or x.ndim != 1 or not (x.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"conv_rows wants a flat float32 x and a C-contiguous float32 out (B, {self.n_rows}, "
                             f"{out_h}, w8) with w8 a multiple of 8, got {x.dtype} {x.shape}, {out.dtype} {out.shape}")
        if batches and (batches - 1) * self.n_in + (out_h - 1) * row_step + self._reach + w8 > x.size:
            raise ValueError(f"conv_rows: x holds {x.size} floats, the product would read past them")
        if batches == 0 or out_h == 0 or w8 == 0:
            return
        threads = threads if self.vals.size * batches * out_h * w8 >= PARALLEL_MIN_WORK else 1
        key = ("conv_rows", threads, batches, out_h, row_step, w8)
        plan = self._plans.get(key)
        if plan is None:
            runs = [(offset * 4, count, kernel(width, self.cols.dtype, self.lanes))
                    for offset, width, count in column_chunks(w8, 64)]
            starts, ends, data = self._bounds[0], self._bounds[-1], self._data
            image_out = n_rows * out_h * w8

            def calls(first: int, images: int, rows: tuple[int, int]) -> list[list[int]]:
                x0, o0 = 4 * first * self.n_in, 4 * first * image_out
                return [[SPMM, fn, starts, ends, *data, x0 + 4 * oh * row_step + offset, 1,
                         o0 + 4 * oh * w8 + offset, out_h * w8, *rows, count, images, self.n_in, image_out]
                        for oh in range(out_h) for offset, count, fn in runs]

            plan = self._plan(key, threads, self._image_tasks(batches, threads, calls))
        plan.run(x.ctypes.data, out.ctypes.data)
