"""Sparse room (kernels): CSR matrix products for the sparse inference modules, compiled from LLVM IR.

A CSR x dense-block product wants each output row's accumulators held in vector registers across the row's
nonzeros: one broadcast weight times one contiguous row of the input per nonzero. numba (tried first) vectorizes
only the short loop over the block's columns and keeps the accumulators in memory, with its SLP vectorizer off:
2-3x slower than the kernels below. Its matrix-vector loop also did not run in parallel. llvmlite (numba's LLVM
binding, PyPI wheels wherever torch has them; no C compiler needed) compiles this IR for the host CPU on first use,
in milliseconds.

Calls are planned as *records* (one kernel call with its arguments each) grouped into *tasks* (row ranges; the
records of one task run in order, since they add into the same output rows). One ctypes call hands a whole plan to
compiled code: the calling thread and the pool's worker threads take tasks from an atomic counter until none are
left, so a worker that wakes late costs half its delay, not all of it. Workers spin for SPIN_SECONDS after each plan
(back-to-back calls, and the layers of one forward pass, find them awake), then sleep in Python on an Event, with no
CPU use. A Python ``ThreadPoolExecutor`` (tried first) took 0.1-0.3 ms per call to wake its thread and pass the GIL
around: 20% of a 1 ms batch-1 product.

Kernels, per column-index width (uint8/16/32):
- ``spmm_{W}``: ``out[r, c:c+W] += sum_k vals[k] * x[cols[k], c:c+W]`` for rows ``r0 <= r < r1`` and ``chunks``
  consecutive column chunks c, over ``blocks`` blocks of x and out (row-major, leading dimensions ``ldx``/``ldo``);
  W in WIDTHS (1 to 8 vectors of 8 floats);
- ``spmv``: ``out[r] += sum_k vals[k] * x[cols[k]]`` (batch 1), four nonzeros per vector multiply-add with
  scalar loads of x, the index and value streams prefetched ahead (``vgatherdps`` measured 20% slower on this
  project's AMD EPYC, 1-byte delta-coded indices 30% slower: a serial running sum);
- ``mask_fill``: ``t[j] = fill`` wherever bit j of a packed keep-mask is clear, for 32-bit tensors (the pruner's
  gradient masking in training: a 1-bit mask is 1/32 of the fp32 mask that torch would multiply by, so a masked
  gradient costs one pass over the gradient and almost none over the mask).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import mmap
import os
import threading
import time

import numpy as np

WIDTHS = (8, 16, 32, 64)  # floats per block row: 1, 2, 4, 8 AVX vectors of 8 lanes
_INDEX_TYPES = {np.dtype(np.uint8): "i8", np.dtype(np.uint16): "i16", np.dtype(np.uint32): "i32"}
_VEC = "<8 x float>"
_VOID, _I64 = ctypes.c_void_p, ctypes.c_int64
_ENTRY_POINTS = {  # name: ctypes signature of the functions called from Python (plan runner, pool, mask kernel)
    "run_records": ctypes.CFUNCTYPE(None, _VOID, _I64, _I64, _I64, _I64),
    "post": ctypes.CFUNCTYPE(_I64, _VOID, _VOID, _I64, _VOID, _VOID, _I64, _I64, _I64),
    "finish": ctypes.CFUNCTYPE(None, _VOID, _I64),
    "worker_loop": ctypes.CFUNCTYPE(_I64, _VOID, _VOID, _I64),
    "spin_probe": ctypes.CFUNCTYPE(None, _VOID, _I64),
    "mask_fill": ctypes.CFUNCTYPE(None, _VOID, _VOID, _I64, _I64),
}
RECORD = 16  # int64 per record: kind (0 spmm, 1 spmv, 2 mask), function address, up to 14 arguments (x, out as
# offsets)
SPMM, SPMV, MASK = 0, 1, 2
MAX_TASKS = (1 << 20) - 1  # the task counter and count share one 64-bit word with the plan's sequence number
SPIN_SECONDS = 2e-4  # how long a worker stays awake for the next plan (OpenMP's default active wait is longer)
MAX_WORKERS = 63  # post() reports sleeping workers as bits of an int64
PREFETCH_AHEAD = 256  # nonzeros ahead that the matrix-vector kernel prefetches (1 KiB of values)
CHUNKS_PER_THREAD = 4  # tasks per thread: finer balances late wake-ups, coarser re-reads fewer input tiles

# Below these sizes one thread does it all: waking a sleeping worker costs ~50 us, more than it saves (measured on
# 2 cores with the first, Python pool, whose threads slept the same way: a 300x784 layer at 8% is faster serial up
# to batch 32, a 4096x4096 one at 9% parallel from batch 1).
PARALLEL_MIN_WORK = 1 << 22  # multiply-adds of a batched product (nonzeros x columns)
PARALLEL_MIN_NONZEROS = 1 << 19  # nonzeros of a matrix-vector product (batch 1)
PARALLEL_MIN_MASKED = 1 << 21  # entries of a masked fill (8 MiB of fp32: a pass over it takes longer than a wake-up)

_lock = threading.Lock()  # compiling
_pool_lock = threading.Lock()  # starting the pool
_addresses: dict[tuple[int, str], int] = {}
_entry: dict[str, ctypes._CFuncPtr] = {}
_engines: list = []  # keep the compiled code alive
_pool: _Pool | None = None


def _function_ir(width: int, index: str) -> str:
    """IR of one kernel; nonzeros taken ``unroll`` at a time into as many accumulator sets (more FMA chains)."""
    vectors = width // 8
    unroll = 2 if vectors <= 4 else 1  # 8 vectors x 2 sets would not fit the 16 AVX registers
    lines = [f"define void @spmm_{width}_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %vals, ptr noalias %x, i64 %ldx, ptr noalias %out, i64 %ldo, i64 %r0, i64 %r1, "
             "i64 %chunks, i64 %blocks, i64 %xstep, i64 %ostep) nounwind {",
             # for each block b < blocks (x and out advance by xstep/ostep floats) and each of ``chunks`` column
             # chunks of W floats: the rows r0 <= r < r1
             "entry:", "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %block, label %exit",
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
    for i in range(vectors):
        lines += [f"  %op{i} = getelementptr float, ptr %orow, i64 {8 * i}",
                  f"  %init{i} = load {_VEC}, ptr %op{i}, align 4"]
    lines += ["  br label %loop", "loop:", "  %k = phi i64 [%s, %row], [%k.next, %body]"]
    for u in range(unroll):
        for i in range(vectors):
            start = f"%init{i}" if u == 0 else "zeroinitializer"
            lines.append(f"  %acc{u}.{i} = phi {_VEC} [{start}, %row], [%new{u}.{i}, %body]")
    lines += [f"  %k.next = add nuw i64 %k, {unroll}", "  %more = icmp ule i64 %k.next, %e",
              "  br i1 %more, label %body, label %tail", "body:"]

    def nonzero(tag: str, k: str, acc: str, new: str) -> list[str]:
        out = [f"  %cp{tag} = getelementptr {index}, ptr %cols, i64 {k}", f"  %cn{tag} = load {index}, ptr %cp{tag}",
               f"  %c{tag} = zext {index} %cn{tag} to i64", f"  %xoff{tag} = mul nuw i64 %c{tag}, %ldx",
               f"  %xr{tag} = getelementptr float, ptr %xc, i64 %xoff{tag}",
               f"  %vp{tag} = getelementptr float, ptr %vals, i64 {k}", f"  %v{tag} = load float, ptr %vp{tag}",
               f"  %vi{tag} = insertelement {_VEC} poison, float %v{tag}, i32 0",
               f"  %vb{tag} = shufflevector {_VEC} %vi{tag}, {_VEC} poison, <8 x i32> zeroinitializer"]
        for i in range(vectors):
            out += [f"  %xp{tag}.{i} = getelementptr float, ptr %xr{tag}, i64 {8 * i}",
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
    else:
        lines += ["  br label %store", "store:"]
        results = [f"%acc0.{i}" for i in range(vectors)]
    lines += [f"  store {_VEC} {r}, ptr %op{i}, align 4" for i, r in enumerate(results)]
    lines += ["  %o.next = add nuw i64 %o, 1", "  %rows.left = icmp ult i64 %o.next, %r1",
              "  br i1 %rows.left, label %row, label %chunk.end",
              "chunk.end:", "  %ch.next = add nuw i64 %ch, 1", "  %chunks.left = icmp ult i64 %ch.next, %chunks",
              "  br i1 %chunks.left, label %chunk, label %block.end",
              "block.end:", "  %b.next = add nuw i64 %b, 1", "  %blocks.left = icmp ult i64 %b.next, %blocks",
              "  br i1 %blocks.left, label %block, label %exit", "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _matvec_ir(index: str) -> str:
    """IR of ``out[o] += sum_k vals[k] * x[cols[k]]`` (batch 1).

    Four nonzeros at a time: one load of four column indices, one of four values, four scalar loads of x inserted
    into a vector, one vector multiply-add; two such groups per pass into two accumulators. Half the loads of a
    scalar loop (measured 1.2x faster; AVX2 gathers and software prefetch were no faster than scalar)."""
    groups, vec = 2, "<4 x float>"
    lines = [f"define void @spmv_{index}(ptr noalias %starts, ptr noalias %ends, ptr noalias %cols, "
             "ptr noalias %vals, ptr noalias %x, ptr noalias %out, i64 %r0, i64 %r1) nounwind {",
             "entry:", "  %any = icmp ult i64 %r0, %r1", "  br i1 %any, label %row, label %exit",
             "row:", "  %o = phi i64 [%r0, %entry], [%o.next, %store]",
             "  %sp = getelementptr i32, ptr %starts, i64 %o", "  %s32 = load i32, ptr %sp",
             "  %ep = getelementptr i32, ptr %ends, i64 %o", "  %e32 = load i32, ptr %ep",
             "  %s = zext i32 %s32 to i64", "  %e = zext i32 %e32 to i64",
             "  %outp = getelementptr float, ptr %out, i64 %o", "  %init = load float, ptr %outp",
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


def _mask_ir() -> str:
    """IR of ``mask_fill(t, bits, n, fill)``: for j < n, ``t[j] = fill`` (a 32-bit pattern) where bit j of ``bits``
    (little-endian bit order within each byte) is clear. Eight entries per mask byte, blended with integer and/or
    through lane masks looked up in a 256-entry table (8 KiB, in L1). Lane masks computed from the byte instead are
    recognised by LLVM as a select and lowered to a masked store, which ran ~10x slower on this project's AMD EPYC."""
    table = ", ".join("<8 x i32> <" + ", ".join(f"i32 {-1 if b >> i & 1 else 0}" for i in range(8)) + ">"
                      for b in range(256))
    return "\n".join([
        f"@lane_masks = private unnamed_addr constant [256 x <8 x i32>] [{table}], align 32", "",
        # the fill travels as i64 (records pass int64 arguments) and is truncated here
        "define void @mask_fill(ptr noalias %t, ptr noalias %bits, i64 %n, i64 %fill64) nounwind {",
        "entry:", "  %fill = trunc i64 %fill64 to i32", "  %fi = insertelement <8 x i32> poison, i32 %fill, i32 0",
        "  %fv = shufflevector <8 x i32> %fi, <8 x i32> poison, <8 x i32> zeroinitializer",
        "  %bytes = lshr i64 %n, 3", "  %any = icmp ugt i64 %bytes, 0", "  br i1 %any, label %loop, label %tail",
        "loop:", "  %i = phi i64 [0, %entry], [%i.next, %loop]",
        "  %bp = getelementptr i8, ptr %bits, i64 %i", "  %b = load i8, ptr %bp", "  %bz = zext i8 %b to i64",
        "  %mp = getelementptr [256 x <8 x i32>], ptr @lane_masks, i64 0, i64 %bz",
        "  %keep = load <8 x i32>, ptr %mp, align 32",
        "  %off = shl i64 %i, 3", "  %tp = getelementptr i32, ptr %t, i64 %off",
        "  %tv = load <8 x i32>, ptr %tp, align 4", "  %kv = and <8 x i32> %tv, %keep",
        "  %drop = xor <8 x i32> %keep, <i32 -1, i32 -1, i32 -1, i32 -1, i32 -1, i32 -1, i32 -1, i32 -1>",
        "  %dv = and <8 x i32> %fv, %drop", "  %r = or <8 x i32> %kv, %dv", "  store <8 x i32> %r, ptr %tp, align 4",
        "  %i.next = add nuw i64 %i, 1", "  %more = icmp ult i64 %i.next, %bytes",
        "  br i1 %more, label %loop, label %tail",
        "tail:", "  %j0 = shl i64 %bytes, 3", "  br label %tcheck",
        "tcheck:", "  %j = phi i64 [%j0, %tail], [%j.next, %tnext]", "  %left = icmp ult i64 %j, %n",
        "  br i1 %left, label %tbody, label %exit",
        "tbody:", "  %jb = lshr i64 %j, 3", "  %jbp = getelementptr i8, ptr %bits, i64 %jb",
        "  %jbyte = load i8, ptr %jbp", "  %jbit8 = trunc i64 %j to i8", "  %jsh = and i8 %jbit8, 7",
        "  %jv = lshr i8 %jbyte, %jsh", "  %jk = and i8 %jv, 1", "  %jdrop = icmp eq i8 %jk, 0",
        "  br i1 %jdrop, label %tfill, label %tnext",
        "tfill:", "  %jp = getelementptr i32, ptr %t, i64 %j", "  store i32 %fill, ptr %jp, align 4",
        "  br label %tnext",
        "tnext:", "  %j.next = add nuw i64 %j, 1", "  br label %tcheck",
        "exit:", "  ret void", "}"])


def _pause_ir(triple: str) -> tuple[str, str]:
    """(declaration, call) of the spin-wait hint of the target, or nothing where there is none."""
    if triple.startswith(("x86_64", "i386", "i686")):
        return "declare void @llvm.x86.sse2.pause()", "  call void @llvm.x86.sse2.pause()"
    if triple.startswith(("aarch64", "arm64")):
        return "declare void @llvm.aarch64.hint(i32)", "  call void @llvm.aarch64.hint(i32 1)"
    return "", ""


# The plan word (job[0]): sequence number << 40 | number of tasks << 20 | next task to take. Taking a task is one
# compare-and-swap on it, so a thread never takes a task of a plan that has been replaced. job[8]: tasks finished
# (its own cache line); job[16], job[17]: addresses of the task table ((first record, count) pairs) and the records;
# job[18]: stop; job[19], job[20]: input and output base addresses. A worker's own line: state (0 awake, 1 gone to
# sleep), last sequence number seen.
_JOB_FINISHED, _JOB_TASKS, _JOB_RECORDS, _JOB_STOP, _JOB_X, _JOB_OUT = 8, 16, 17, 18, 19, 20
_STATE_STRIDE = 8  # int64 per worker: one cache line each


def _pool_ir(pause: str) -> str:
    """IR of the plan runner: records, tasks taken from the atomic counter, post/finish for the calling thread,
    and the workers' spin-then-sleep loop."""
    args = [f"%a{j}" for j in range(RECORD - 2)]
    loads = []
    for j in range(RECORD - 2):
        loads += [f"  %ap{j} = getelementptr i64, ptr %rec, i64 {2 + j}", f"  %a{j} = load i64, ptr %ap{j}"]
    # records hold input/output offsets; the bases of this call's arrays are added here (spmm: arguments 4 and 6,
    # spmv: 4 and 5, mask: the tensor at 4), so a cached plan is never written to and serves concurrent calls
    mm = [*args[:4], "%xa", args[5], "%oa.mm", *args[7:]]
    mv = [*args[:4], "%xa", "%oa.mv", *args[6:8]]
    mm_args = ", ".join(f"i64 {a}" for a in mm)
    mv_args = ", ".join(f"i64 {a}" for a in mv)
    mask_args = ", ".join(f"i64 {a}" for a in ["%xa", *args[:3]])
    mask = (1 << 20) - 1
    # Kernel arguments go through the records as int64 and are passed as such: pointers and int64 travel in the
    # same registers under the x86-64 and AArch64 C calling conventions.
    return "\n".join([
        "define void @run_records(ptr %recs, i64 %first, i64 %count, i64 %xbase, i64 %obase) nounwind {",
        "entry:", "  %end = add i64 %first, %count", "  %any = icmp ult i64 %first, %end",
        "  br i1 %any, label %loop, label %exit",
        "loop:", "  %i = phi i64 [%first, %entry], [%i.next, %next]", f"  %off = mul i64 %i, {RECORD}",
        "  %rec = getelementptr i64, ptr %recs, i64 %off", "  %kind = load i64, ptr %rec",
        "  %fnp = getelementptr i64, ptr %rec, i64 1", "  %fn = load ptr, ptr %fnp", *loads,
        "  %xa = add i64 %a4, %xbase", "  %oa.mm = add i64 %a6, %obase", "  %oa.mv = add i64 %a5, %obase",
        f"  %mv = icmp eq i64 %kind, {SPMV}", "  br i1 %mv, label %callmv, label %notmv",
        "notmv:", f"  %mk = icmp eq i64 %kind, {MASK}", "  br i1 %mk, label %callmask, label %callmm",
        "callmm:", f"  call void %fn({mm_args})", "  br label %next",
        "callmask:", f"  call void %fn({mask_args})", "  br label %next",
        "callmv:", f"  call void %fn({mv_args})", "  br label %next",
        "next:", "  %i.next = add i64 %i, 1", "  %more = icmp ult i64 %i.next, %end",
        "  br i1 %more, label %loop, label %exit", "exit:", "  ret void", "}", "",
        "define void @run_tasks(ptr %job) nounwind {",
        "entry:", "  br label %take",
        "take:", "  %w = load atomic i64, ptr %job seq_cst, align 8", f"  %next = and i64 %w, {mask}",
        "  %n.hi = lshr i64 %w, 20", f"  %n = and i64 %n.hi, {mask}", "  %left = icmp ult i64 %next, %n",
        "  br i1 %left, label %try, label %exit",
        "try:", "  %w1 = add i64 %w, 1", "  %cx = cmpxchg ptr %job, i64 %w, i64 %w1 seq_cst seq_cst",
        "  %ok = extractvalue { i64, i1 } %cx, 1", "  br i1 %ok, label %run, label %take",
        # the plan cannot be replaced while a task taken from it is unfinished: its tables are read after the CAS
        "run:", f"  %tp = getelementptr i64, ptr %job, i64 {_JOB_TASKS}", "  %tasks = load ptr, ptr %tp",
        f"  %rp = getelementptr i64, ptr %job, i64 {_JOB_RECORDS}", "  %recs = load ptr, ptr %rp",
        f"  %xp = getelementptr i64, ptr %job, i64 {_JOB_X}", "  %xbase = load i64, ptr %xp",
        f"  %op = getelementptr i64, ptr %job, i64 {_JOB_OUT}", "  %obase = load i64, ptr %op",
        "  %toff = mul i64 %next, 2", "  %tq = getelementptr i64, ptr %tasks, i64 %toff",
        "  %first = load i64, ptr %tq", "  %cq = getelementptr i64, ptr %tq, i64 1", "  %count = load i64, ptr %cq",
        "  call void @run_records(ptr %recs, i64 %first, i64 %count, i64 %xbase, i64 %obase)",
        f"  %fp = getelementptr i64, ptr %job, i64 {_JOB_FINISHED}",
        "  %old = atomicrmw add ptr %fp, i64 1 seq_cst", "  br label %take",
        "exit:", "  ret void", "}", "",
        # post: publish a plan, then report which workers have gone to sleep (bit i: worker i); the store of the
        # plan word and the workers' store of their state are both seq_cst, so a worker about to sleep either sees
        # the plan or is seen asleep and woken by the caller
        "define i64 @post(ptr %job, ptr %states, i64 %workers, ptr %tasks, ptr %recs, i64 %n, i64 %xbase, "
        "i64 %obase) nounwind {",
        "entry:", f"  %fp = getelementptr i64, ptr %job, i64 {_JOB_FINISHED}",
        "  store atomic i64 0, ptr %fp seq_cst, align 8",
        f"  %tp = getelementptr i64, ptr %job, i64 {_JOB_TASKS}", "  store ptr %tasks, ptr %tp",
        f"  %rp = getelementptr i64, ptr %job, i64 {_JOB_RECORDS}", "  store ptr %recs, ptr %rp",
        f"  %xp = getelementptr i64, ptr %job, i64 {_JOB_X}", "  store i64 %xbase, ptr %xp",
        f"  %op = getelementptr i64, ptr %job, i64 {_JOB_OUT}", "  store i64 %obase, ptr %op",
        "  %w = load atomic i64, ptr %job seq_cst, align 8", "  %seq = lshr i64 %w, 40", "  %seq1 = add i64 %seq, 1",
        "  %seqm = and i64 %seq1, 16777215", "  %hi = shl i64 %seqm, 40", "  %nn = shl i64 %n, 20",
        "  %word = or i64 %hi, %nn", "  store atomic i64 %word, ptr %job seq_cst, align 8",
        "  %any = icmp sgt i64 %workers, 0", "  br i1 %any, label %scan, label %done",
        "scan:", "  %i = phi i64 [0, %entry], [%i.next, %scan]", "  %m = phi i64 [0, %entry], [%m.next, %scan]",
        f"  %soff = mul i64 %i, {_STATE_STRIDE}", "  %sp = getelementptr i64, ptr %states, i64 %soff",
        "  %st = load atomic i64, ptr %sp seq_cst, align 8", "  %bit = shl i64 %st, %i",
        "  %m.next = or i64 %m, %bit", "  %i.next = add i64 %i, 1", "  %more = icmp slt i64 %i.next, %workers",
        "  br i1 %more, label %scan, label %done",
        "done:", "  %mask = phi i64 [0, %entry], [%m.next, %scan]", "  ret i64 %mask", "}", "",
        # finish: the caller takes tasks too, then waits for those other threads still run
        "define void @finish(ptr %job, i64 %n) nounwind {",
        "entry:", "  call void @run_tasks(ptr %job)", f"  %fp = getelementptr i64, ptr %job, i64 {_JOB_FINISHED}",
        "  br label %wait",
        "wait:", "  %f = load atomic i64, ptr %fp seq_cst, align 8", "  %all = icmp sge i64 %f, %n",
        "  br i1 %all, label %exit, label %spin", "spin:", pause, "  br label %wait",
        "exit:", "  ret void", "}", "",
        # worker_loop: run plans as they are posted; after ``spin`` idle rounds announce sleep and return 1 (the
        # Python side waits on its Event), or return 0 when stopped
        "define i64 @worker_loop(ptr %job, ptr %me, i64 %spin) nounwind {",
        "entry:", "  store atomic i64 0, ptr %me seq_cst, align 8", "  %lastp = getelementptr i64, ptr %me, i64 1",
        f"  %stopp = getelementptr i64, ptr %job, i64 {_JOB_STOP}", "  br label %check",
        "check:", "  %i = phi i64 [0, %entry], [%i.next, %idle], [0, %work]",
        "  %stop = load atomic i64, ptr %stopp seq_cst, align 8", "  %stopped = icmp ne i64 %stop, 0",
        "  br i1 %stopped, label %ret0, label %look",
        "look:", "  %w = load atomic i64, ptr %job seq_cst, align 8", "  %seq = lshr i64 %w, 40",
        "  %last = load i64, ptr %lastp", "  %new = icmp ne i64 %seq, %last", "  br i1 %new, label %work, label %idle",
        "work:", "  %s = phi i64 [%seq, %look], [%seq2, %wake]", "  store i64 %s, ptr %lastp",
        "  call void @run_tasks(ptr %job)", "  br label %check",
        "idle:", pause, "  %i.next = add i64 %i, 1", "  %go = icmp ult i64 %i.next, %spin",
        "  br i1 %go, label %check, label %sleep",
        "sleep:", "  store atomic i64 1, ptr %me seq_cst, align 8",
        "  %w2 = load atomic i64, ptr %job seq_cst, align 8",
        "  %seq2 = lshr i64 %w2, 40", "  %last2 = load i64, ptr %lastp", "  %new2 = icmp ne i64 %seq2, %last2",
        "  br i1 %new2, label %wake, label %ret1",
        "wake:", "  store atomic i64 0, ptr %me seq_cst, align 8", "  br label %work",
        "ret1:", "  ret i64 1", "ret0:", "  ret i64 0", "}", "",
        # spin_probe: ``n`` idle rounds of the worker loop, for calibrating SPIN_SECONDS to rounds
        "define void @spin_probe(ptr %word, i64 %n) nounwind {",
        "entry:", "  br label %loop", "loop:", "  %i = phi i64 [0, %entry], [%i.next, %loop]",
        "  %w = load atomic i64, ptr %word seq_cst, align 8", pause, "  %i.next = add i64 %i, 1",
        "  %go = icmp ult i64 %i.next, %n", "  br i1 %go, label %loop, label %exit", "exit:", "  ret void", "}",
    ])


def _jit(ir: str):
    """Compile IR for the host CPU; returns the execution engine, which keeps the code alive."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3)
    module = llvm.parse_assembly(ir)
    module.verify()
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(module, builder)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    return engine


def _compile_core() -> None:
    """The plan runner, the pool's loops and the mask kernel: all that training needs (~10 ms; the products'
    kernels take ~0.4 s and ~75 MB more, so a pruner masking gradients does not compile them)."""
    import llvmlite.binding as llvm

    pause_declaration, pause = _pause_ir(llvm.get_process_triple())
    engine = _jit("\n\n".join([pause_declaration, _mask_ir(), _pool_ir(pause)]))
    _addresses[0, "mask"] = engine.get_function_address("mask_fill")
    for name, signature in _ENTRY_POINTS.items():
        _entry[name] = signature(engine.get_function_address(name))
    _engines.append(engine)


def _compile_products() -> None:
    engine = _jit("\n\n".join(
        ["declare float @llvm.vector.reduce.fadd.v4f32(float, <4 x float>)",
         "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"]
        + [_function_ir(w, t) for w in WIDTHS for t in _INDEX_TYPES.values()]
        + [_matvec_ir(t) for t in _INDEX_TYPES.values()]))
    for width in WIDTHS:
        for index in _INDEX_TYPES.values():
            _addresses[width, index] = engine.get_function_address(f"spmm_{width}_{index}")
    for index in _INDEX_TYPES.values():
        _addresses[1, index] = engine.get_function_address(f"spmv_{index}")
    _engines.append(engine)


def _ensure_core() -> None:
    if not _entry:
        with _lock:
            if not _entry:
                _compile_core()


def _ensure_compiled() -> None:
    _ensure_core()
    if (1, "i8") not in _addresses:
        with _lock:
            if (1, "i8") not in _addresses:
                _compile_products()


def kernel(width: int, index_dtype: np.dtype) -> int:
    """Address of the compiled kernel for a block ``width`` (one of WIDTHS, or 1 for the matrix-vector product)
    and a column-index dtype (uint8/16/32)."""
    _ensure_compiled()
    return _addresses[width, _INDEX_TYPES[np.dtype(index_dtype)]]


HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 4 << 20  # arrays from this size go on transparent huge pages where the kernel offers them


def huge_page_array(a: np.ndarray) -> np.ndarray:
    """``a`` itself, or for a large array on Linux a copy in memory advised for transparent huge pages.

    The kernels stream the index and value arrays once per call; from memory (a large layer after others evicted
    the cache) 4 KiB pages cost a TLB miss every 1024 values and stop the hardware prefetcher at each boundary.
    Measured ~5% faster (min) and ~12% (median) on a 9216x4096 layer at 9%, batch 1. Costs at most one huge page
    of rounding per array."""
    if a.nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return a
    try:
        region = mmap.mmap(-1, a.nbytes + HUGE_PAGE)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return a
    raw = np.frombuffer(region, dtype=np.uint8)  # holds the mapping alive
    skip = -raw.ctypes.data % HUGE_PAGE
    out = raw[skip:skip + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _aligned_zeros(n: int) -> np.ndarray:
    """n int64 zeros starting on a 64-byte boundary (one cache line per hot word)."""
    raw = np.zeros(n + 8, dtype=np.int64)
    skip = (-raw.ctypes.data % 64) // 8
    return raw[skip:skip + n]


class _Pool:
    """Worker threads that run posted plans in compiled code, spinning briefly between plans."""

    def __init__(self) -> None:
        _ensure_core()
        self.job = _aligned_zeros(32)
        self.states = _aligned_zeros(MAX_WORKERS * _STATE_STRIDE)
        self.threads: list[threading.Thread] = []
        self.events: list[threading.Event] = []
        self.lock = threading.Lock()
        self.spin = self._calibrate()

    def _calibrate(self) -> int:
        rounds = 20000
        start = time.perf_counter()
        _entry["spin_probe"](self.job.ctypes.data + 8 * _JOB_STOP, rounds)
        per_round = max((time.perf_counter() - start) / rounds, 1e-9)
        return max(int(SPIN_SECONDS / per_round), 1)

    def _grow(self, workers: int) -> None:
        while len(self.threads) < min(workers, MAX_WORKERS):
            i = len(self.threads)
            self.states[i * _STATE_STRIDE] = 0
            event = threading.Event()
            thread = threading.Thread(target=self._work, args=(i, event), name=f"magprune-spmm-{i}", daemon=True)
            self.events.append(event)
            self.threads.append(thread)
            thread.start()

    def _work(self, i: int, event: threading.Event) -> None:
        job, me = self.job.ctypes.data, self.states.ctypes.data + 8 * _STATE_STRIDE * i
        loop = _entry["worker_loop"]
        while loop(job, me, self.spin):  # ctypes releases the GIL for the whole native loop
            event.wait()
            event.clear()

    def run(self, plan: Plan, x_address: int, out_address: int) -> None:
        """Run every task of the plan on the calling thread and up to ``plan.threads - 1`` workers."""
        threads = plan.threads
        if not self.lock.acquire(blocking=False):  # another Python thread's plan is running: do this one alone
            _entry["run_records"](plan.records_address, 0, plan.n_records, x_address, out_address)
            return
        try:
            self._grow(threads - 1)
            asleep = _entry["post"](self.job.ctypes.data, self.states.ctypes.data, len(self.threads),
                                    plan.tasks_address, plan.records_address, plan.n_tasks, x_address, out_address)
            for i, event in enumerate(self.events[:threads - 1]):
                if asleep >> i & 1:
                    event.set()
            _entry["finish"](self.job.ctypes.data, plan.n_tasks)
        finally:
            self.lock.release()

    def close(self) -> None:
        self.job[_JOB_STOP] = 1
        for event in self.events:
            event.set()
        for thread in self.threads:
            thread.join(timeout=1.0)


def _get_pool() -> _Pool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = _Pool()
    return _pool


def _shutdown() -> None:
    if _pool is not None:
        _pool.close()


def _forget_pool_in_child() -> None:
    global _pool, _lock, _pool_lock
    _pool, _lock, _pool_lock = None, threading.Lock(), threading.Lock()  # the child has none of the parent's threads


atexit.register(_shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


class Plan:
    """Kernel calls for one call shape: ``records`` (n, RECORD) int64 with input/output addresses as offsets, and
    ``tasks`` (t, 2) int64, each a (first record, count) run of records that must run in order on one thread."""

    def __init__(self, per_task: list[list[list[int]]], threads: int) -> None:
        if len(per_task) > MAX_TASKS:
            raise ValueError(f"a plan has at most {MAX_TASKS} tasks, got {len(per_task)}")
        self.records = np.array([r for task in per_task for r in task], dtype=np.int64).reshape(-1, RECORD)
        counts = np.array([len(task) for task in per_task], dtype=np.int64)
        self.tasks = np.ascontiguousarray(np.stack([np.cumsum(counts) - counts, counts], axis=1))
        self.n_records, self.n_tasks = self.records.shape[0], self.tasks.shape[0]
        self.records_address, self.tasks_address = self.records.ctypes.data, self.tasks.ctypes.data
        self.threads = threads if self.n_tasks > 1 else 1

    def run(self, x_address: int, out_address: int) -> None:
        if self.threads <= 1:
            _ensure_core()
            _entry["run_records"](self.records_address, 0, self.n_records, x_address, out_address)
        else:
            _get_pool().run(self, x_address, out_address)


class BitMask:
    """A boolean keep-mask packed eight entries to the byte (little-endian bit order), for setting the dropped
    entries of a contiguous tensor of 32-bit values in place with one pass of compiled code.

    Large tensors (PARALLEL_MIN_MASKED entries and up) are split across the pool's threads. Pickling and copying
    keep only the bits."""

    def __init__(self, keep: np.ndarray) -> None:
        flat = np.ascontiguousarray(keep, dtype=np.bool_).reshape(-1)
        self.numel = flat.size
        self.bits = np.packbits(flat, bitorder="little")
        self._plans: dict[tuple[int, int], Plan] = {}

    def __getstate__(self) -> dict:
        return {"numel": self.numel, "bits": self.bits}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plans = {}

    def fill(self, address: int, fill_bits: int = 0, threads: int = 1) -> None:
        """Set every dropped entry of the ``numel`` contiguous 32-bit values at ``address`` (the caller vouches for
        them) to the 32-bit pattern ``fill_bits`` (0: zero them)."""
        _ensure_core()
        if threads <= 1 or self.numel < PARALLEL_MIN_MASKED:
            _entry["mask_fill"](address, self.bits.ctypes.data, self.numel, fill_bits)
            return
        key = (threads, fill_bits)
        plan = self._plans.get(key)
        if plan is None:
            fn, bits = _addresses[0, "mask"], self.bits.ctypes.data
            parts = threads * CHUNKS_PER_THREAD
            # chunks start on mask bytes (multiples of 8 entries); the last one takes the tail
            cuts = sorted({8 * ((self.numel // 8) * i // parts) for i in range(parts)} | {self.numel})
            records = [[[MASK, fn, bits + a // 8, b - a, fill_bits, 0, 4 * a] + [0] * (RECORD - 7)]
                       for a, b in itertools.pairwise(cuts)]
            plan = self._plans[key] = Plan(records, threads)
        plan.run(address, 0)


def row_splits(indptr: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous row ranges with about equal nonzeros each."""
    n_rows = indptr.shape[0] - 1
    cuts = [0] + [int(np.searchsorted(indptr, indptr[-1] * i / parts)) for i in range(1, parts)] + [n_rows]
    cuts = sorted(min(max(c, 0), n_rows) for c in cuts)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


TILE_ROWS = 2048  # input rows per tile: 2048 x 32 floats = 256 KiB of the input block, inside a 512 KiB+ L2


def tile_pointers(indptr: np.ndarray, cols: np.ndarray, n_in: int, tile_rows: int = TILE_ROWS) -> np.ndarray:
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


class CSRProduct:
    """A CSR matrix ready for the kernels: row pointers split by input tile, narrow column indices, float32 values.

    Plans (records and tasks, see the module docstring) are cached per call shape with the input and output
    addresses left out; the compiled runner adds a call's addresses in. Pickling and copying keep only the arrays.
    """

    def __init__(self, indptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_in: int,
                 tile_rows: int = TILE_ROWS) -> None:
        if indptr.dtype != np.int32 or cols.dtype not in _INDEX_TYPES or vals.dtype != np.float32:
            raise ValueError(f"CSRProduct wants int32 row pointers, uint8/16/32 columns and float32 values, got "
                             f"{indptr.dtype}, {cols.dtype}, {vals.dtype}")
        self.n_in = n_in
        self.cols, self.vals = np.ascontiguousarray(cols), np.ascontiguousarray(vals)
        self.tiles = tile_pointers(indptr, self.cols, n_in, tile_rows)
        self._prepare()

    def _prepare(self) -> None:
        self.cols, self.vals = huge_page_array(self.cols), huge_page_array(self.vals)
        self.n_rows = self.tiles.shape[1]
        self._bounds = [self.tiles[t].ctypes.data for t in range(self.tiles.shape[0])]
        self._data = (self.cols.ctypes.data, self.vals.ctypes.data)
        self._row_nnz_end = np.concatenate([self.tiles[0, :1], self.tiles[-1]]) if self.n_rows else None
        self._plans: dict[tuple, Plan] = {}
        self._reach = int(self.cols.max()) if self.cols.size else 0  # the largest column (conv_rows' bounds check)

    def __getstate__(self) -> dict:
        return {"n_in": self.n_in, "cols": self.cols, "vals": self.vals, "tiles": self.tiles}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._prepare()

    def _ranges(self, parts: int) -> list[tuple[int, int]]:
        if parts <= 1:
            return [(0, self.n_rows)] if self.n_rows else []
        return row_splits(self._row_nnz_end, parts)

    def _plan(self, key: tuple, threads: int, per_task: list[list[list[int]]]) -> Plan:
        if len(self._plans) >= 16:  # a model sees few shapes; do not grow without bound on varying ones
            self._plans.clear()
        plan = self._plans[key] = Plan(per_task, threads)
        return plan

    def matvec(self, x: np.ndarray, out: np.ndarray, threads: int) -> None:
        """out += W @ x for x (n_in,) and out (n_rows,) contiguous float32. The vector stays in cache: untiled."""
        if x.shape != (self.n_in,) or out.shape != (self.n_rows,) or x.dtype != np.float32 \
                or out.dtype != np.float32 or not (x.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError(f"matvec wants contiguous float32 x ({self.n_in},) and out ({self.n_rows},), got "
                             f"{x.dtype} {x.shape} and {out.dtype} {out.shape}")
        self.matvec_at(x.ctypes.data, out, threads)

    def matvec_at(self, x_address: int, out: np.ndarray, threads: int) -> None:
        """:meth:`matvec` with x given by the address of n_in contiguous float32 (the caller vouches for it)."""
        if out.shape != (self.n_rows,) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"matvec wants a contiguous float32 out ({self.n_rows},), got {out.dtype} {out.shape}")
        threads = threads if self.vals.size >= PARALLEL_MIN_NONZEROS else 1
        plan = self._plans.get(("matvec", threads))
        if plan is None:
            fn = kernel(1, self.cols.dtype)
            starts, ends = self._bounds[0], self._bounds[-1]
            plan = self._plan(("matvec", threads), threads,
                              [[[SPMV, fn, starts, ends, *self._data, 0, 0, *rows] + [0] * 6]
                               for rows in self._ranges(threads * CHUNKS_PER_THREAD)])
        plan.run(x_address, out.ctypes.data)

    def matmul(self, x: np.ndarray, out: np.ndarray, threads: int, widest: int = 32) -> None:
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
        threads = threads if self.vals.size * batches * m >= PARALLEL_MIN_WORK else 1
        x_step, o_step = x.strides[0] // 4, out.strides[0] // 4
        key = ("matmul", threads, batches, m, widest, x_step, o_step)
        plan = self._plans.get(key)
        if plan is None:
            runs = [(offset * 4, count, kernel(width, self.cols.dtype))
                    for offset, width, count in column_chunks(m, widest)]
            bounds, data = self._bounds, self._data
            # each task reads all of x again: as many tasks as keep that below the bytes of the weight, so late
            # threads can still be balanced where x is small (batch 32) and x is not re-read where it is large
            weight_bytes = self.vals.nbytes + self.cols.nbytes
            parts = threads * max(min(CHUNKS_PER_THREAD, weight_bytes // max(x.nbytes * threads, 1)), 1)
            plan = self._plan(key, threads, [
                [[SPMM, fn, starts, ends, *data, offset, m, offset, m, *rows, count, batches, x_step, o_step]
                 for starts, ends in itertools.pairwise(bounds) for offset, count, fn in runs]
                for rows in self._ranges(parts)])
        plan.run(x.ctypes.data, out.ctypes.data)

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
            runs = [(offset * 4, count, kernel(width, self.cols.dtype))
                    for offset, width, count in column_chunks(w8, 64)]
            starts, ends, data = self._bounds[0], self._bounds[-1], self._data
            image_out = n_rows * out_h * w8

            def calls(first: int, images: int, rows: tuple[int, int]) -> list[list[int]]:
                x0, o0 = 4 * first * self.n_in, 4 * first * image_out
                return [[SPMM, fn, starts, ends, *data, x0 + 4 * oh * row_step + offset, 1,
                         o0 + 4 * oh * w8 + offset, out_h * w8, *rows, count, images, self.n_in, image_out]
                        for oh in range(out_h) for offset, count, fn in runs]

            if threads > 1 and batches >= 2 * threads:
                cuts = np.linspace(0, batches, min(batches, threads * CHUNKS_PER_THREAD) + 1).astype(int)
                per_task = [calls(a, b - a, (0, n_rows)) for a, b in itertools.pairwise(cuts)]
            else:
                per_task = [calls(0, batches, rows) for rows in self._ranges(threads * CHUNKS_PER_THREAD)]
            plan = self._plan(key, threads, per_task)
        plan.run(x.ctypes.data, out.ctypes.data)
