"""Kernels room (thread pool): plans of kernel calls run by the calling thread and native worker threads.

Calls are planned as *records* (one kernel call with its arguments each) grouped into *tasks* (row ranges; the
records of one task run in order, since they add into the same output rows). One ctypes call hands a whole plan to
compiled code: the calling thread and the pool's worker threads take tasks from an atomic counter until none are
left, so a worker that wakes late costs half its delay, not all of it. Workers spin for SPIN_SECONDS after each plan
(back-to-back calls, and the layers of one forward pass, find them awake), then sleep in Python on an Event, with no
CPU use. A Python ``ThreadPoolExecutor`` (tried first) took 0.1-0.3 ms per call to wake its thread and pass the GIL
around: 20% of a 1 ms batch-1 product.

Where torch runs on GNU OpenMP (its Linux wheels; ``libgomp`` loaded in the process), plans run on torch's own
OpenMP team instead (``GOMP_parallel``): after a torch op its OpenMP threads spin for milliseconds on the other cores
(libgomp's default wait policy), so a worker of this pool, woken then, found no free core and came too late to help
(a 9216x4096 product at 9%, batch 1, right after a dense layer: 1.31 ms on 2 threads, as slow as on 1; 0.81 ms with
torch's threads made to sleep, on this project's Intel Xeon). On torch's team the product finds those spinning
threads, and torch's next op finds them spinning after it. ``MAGPRUNE_POOL=own`` keeps this pool's workers.

A record's kind says how the runner calls its function: ``SPMM`` and ``SPMV`` (:mod:`.csr`), ``MASK``
(:mod:`.bitmask`); input and output addresses travel as offsets and each call's bases are added in compiled code.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
import time

import numpy as np

from magprune.kernels.jit import compiled, target_triple
from magprune.kernels.memory import aligned_zeros

_VOID, _I64 = ctypes.c_void_p, ctypes.c_int64
_ENTRY_POINTS = {  # name: ctypes signature of the functions called from Python
    "run_records": ctypes.CFUNCTYPE(None, _VOID, _I64, _I64, _I64, _I64, _I64),
    "post": ctypes.CFUNCTYPE(_I64, _VOID, _VOID, _I64, _VOID, _VOID, _I64, _I64, _I64, _I64),
    "finish": ctypes.CFUNCTYPE(None, _VOID, _I64),
    "worker_loop": ctypes.CFUNCTYPE(_I64, _VOID, _VOID, _I64),
    "spin_probe": ctypes.CFUNCTYPE(None, _VOID, _I64),
    "run_openmp": ctypes.CFUNCTYPE(None, _VOID, _VOID, _VOID, _VOID, _I64, _I64, _I64, _I64, _I64),
}
RECORD = 16  # int64 per record: kind (0 spmm, 1 spmv, 2 mask, 3 sddmm), function address, up to 14 arguments (x,
# out as offsets)
SPMM, SPMV, MASK, SDDMM = 0, 1, 2, 3
MAX_TASKS = (1 << 20) - 1  # the task counter and count share one 64-bit word with the plan's sequence number
SPIN_SECONDS = 2e-4  # how long a worker stays awake for the next plan (OpenMP's default active wait is longer)
MAX_WORKERS = 63  # post() reports sleeping workers as bits of an int64
CHUNKS_PER_THREAD = 4  # tasks per thread: finer balances late wake-ups, coarser re-reads fewer input tiles

OPENMP = os.environ.get("MAGPRUNE_POOL", "openmp") != "own"  # plans on torch's OpenMP team where there is one

_pool_lock = threading.Lock()  # starting the pool
_forked = False  # this process is a forked child (of a process that may have run an OpenMP team)
_pool: Pool | None = None


def spmv_row_start_ir() -> list[str]:
    """IR lines of an ``SPMV`` kernel's row start: ``%init`` (what row ``%o``'s sum starts from) read from
    ``%from[o]``, or from ``%out[o]`` where ``%from`` is null, and ``%outp`` (where the row's result goes). The
    runner passes ``%from`` as the ninth argument: a plan run with a third address (a Linear layer's bias) writes
    ``out = bias + W x`` without a pass of its own over ``out``; with none, ``out += W x``."""
    return ["  %outp = getelementptr float, ptr %out, i64 %o", "  %fromp = getelementptr float, ptr %from, i64 %o",
            "  %hasfrom = icmp ne ptr %from, null", "  %initp = select i1 %hasfrom, ptr %fromp, ptr %outp",
            "  %init = load float, ptr %initp"]


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
_JOB_FINISHED, _JOB_TASKS, _JOB_RECORDS, _JOB_STOP, _JOB_X, _JOB_OUT, _JOB_Y = 8, 16, 17, 18, 19, 20, 21
_STATE_STRIDE = 8  # int64 per worker: one cache line each


def _pool_ir(pause: str) -> str:
    """IR of the plan runner: records, tasks taken from the atomic counter, post/finish for the calling thread,
    and the workers' spin-then-sleep loop."""
    args = [f"%a{j}" for j in range(RECORD - 2)]
    loads = []
    for j in range(RECORD - 2):
        loads += [f"  %ap{j} = getelementptr i64, ptr %rec, i64 {2 + j}", f"  %a{j} = load i64, ptr %ap{j}"]
    # records hold input/output offsets; the bases of this call's arrays are added here (spmm: arguments 4 and 6,
    # spmv: 4 and 5, its ninth argument, where each row's sum starts (null: out itself), at 8 with the third base;
    # mask: the tensor at 4, sddmm: x at 4, its output values at 3 and the output gradient at 6 with the third
    # base), so a cached plan is never written to and serves concurrent calls
    mm = [*args[:4], "%xa", args[5], "%oa.mm", *args[7:]]
    mv = [*args[:4], "%xa", "%oa.mv", *args[6:8], "%ya.mv"]
    mm_args = ", ".join(f"i64 {a}" for a in mm)
    mv_args = ", ".join(f"i64 {a}" for a in mv)
    mask_args = ", ".join(f"i64 {a}" for a in ["%xa", *args[:3]])
    sd_args = ", ".join(f"i64 {a}" for a in [*args[:3], "%oa.sd", "%xa", args[5], "%ya.sd", *args[7:14]])
    mask = (1 << 20) - 1
    # Kernel arguments go through the records as int64 and are passed as such: pointers and int64 travel in the
    # same registers under the x86-64 and AArch64 C calling conventions.
    return "\n".join([
        "define void @run_records(ptr %recs, i64 %first, i64 %count, i64 %xbase, i64 %obase, i64 %ybase) nounwind {",
        "entry:", "  %end = add i64 %first, %count", "  %any = icmp ult i64 %first, %end",
        "  br i1 %any, label %loop, label %exit",
        "loop:", "  %i = phi i64 [%first, %entry], [%i.next, %next]", f"  %off = mul i64 %i, {RECORD}",
        "  %rec = getelementptr i64, ptr %recs, i64 %off", "  %kind = load i64, ptr %rec",
        "  %fnp = getelementptr i64, ptr %rec, i64 1", "  %fn = load ptr, ptr %fnp", *loads,
        "  %xa = add i64 %a4, %xbase", "  %oa.mm = add i64 %a6, %obase", "  %oa.mv = add i64 %a5, %obase",
        "  %oa.sd = add i64 %a3, %obase", "  %ya.sd = add i64 %a6, %ybase", "  %ya.mv = add i64 %a8, %ybase",
        f"  %mv = icmp eq i64 %kind, {SPMV}", "  br i1 %mv, label %callmv, label %notmv",
        "notmv:", f"  %mk = icmp eq i64 %kind, {MASK}", "  br i1 %mk, label %callmask, label %notmask",
        "notmask:", f"  %sd = icmp eq i64 %kind, {SDDMM}", "  br i1 %sd, label %callsd, label %callmm",
        "callsd:", f"  call void %fn({sd_args})", "  br label %next",
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
        f"  %yp = getelementptr i64, ptr %job, i64 {_JOB_Y}", "  %ybase = load i64, ptr %yp",
        "  %toff = mul i64 %next, 2", "  %tq = getelementptr i64, ptr %tasks, i64 %toff",
        "  %first = load i64, ptr %tq", "  %cq = getelementptr i64, ptr %tq, i64 1", "  %count = load i64, ptr %cq",
        "  call void @run_records(ptr %recs, i64 %first, i64 %count, i64 %xbase, i64 %obase, i64 %ybase)",
        f"  %fp = getelementptr i64, ptr %job, i64 {_JOB_FINISHED}",
        "  %old = atomicrmw add ptr %fp, i64 1 seq_cst", "  br label %take",
        "exit:", "  ret void", "}", "",
        # post: publish a plan, then report which workers have gone to sleep (bit i: worker i); the store of the
        # plan word and the workers' store of their state are both seq_cst, so a worker about to sleep either sees
        # the plan or is seen asleep and woken by the caller
        "define i64 @post(ptr %job, ptr %states, i64 %workers, ptr %tasks, ptr %recs, i64 %n, i64 %xbase, "
        "i64 %obase, i64 %ybase) nounwind {",
        "entry:", f"  %fp = getelementptr i64, ptr %job, i64 {_JOB_FINISHED}",
        "  store atomic i64 0, ptr %fp seq_cst, align 8",
        f"  %tp = getelementptr i64, ptr %job, i64 {_JOB_TASKS}", "  store ptr %tasks, ptr %tp",
        f"  %rp = getelementptr i64, ptr %job, i64 {_JOB_RECORDS}", "  store ptr %recs, ptr %rp",
        f"  %xp = getelementptr i64, ptr %job, i64 {_JOB_X}", "  store i64 %xbase, ptr %xp",
        f"  %op = getelementptr i64, ptr %job, i64 {_JOB_OUT}", "  store i64 %obase, ptr %op",
        f"  %yp = getelementptr i64, ptr %job, i64 {_JOB_Y}", "  store i64 %ybase, ptr %yp",
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
        # run_openmp: the plan on an OpenMP team, ``GOMP_parallel(body, job, threads, 0)`` of the libgomp loaded in
        # the process (torch's): every thread of the team, the caller's included, takes tasks; the team's join is
        # the wait. The job array is the caller's own (not the pool workers'), its plan word starts at zero.
        "define void @openmp_body(ptr %job) nounwind {",
        "entry:", "  call void @run_tasks(ptr %job)", "  ret void", "}", "",
        "define void @run_openmp(ptr %parallel, ptr %job, ptr %tasks, ptr %recs, i64 %n, i64 %xbase, i64 %obase, "
        "i64 %ybase, i64 %threads) nounwind {",
        "entry:", f"  %tp = getelementptr i64, ptr %job, i64 {_JOB_TASKS}", "  store ptr %tasks, ptr %tp",
        f"  %rp = getelementptr i64, ptr %job, i64 {_JOB_RECORDS}", "  store ptr %recs, ptr %rp",
        f"  %xp = getelementptr i64, ptr %job, i64 {_JOB_X}", "  store i64 %xbase, ptr %xp",
        f"  %op = getelementptr i64, ptr %job, i64 {_JOB_OUT}", "  store i64 %obase, ptr %op",
        f"  %yp = getelementptr i64, ptr %job, i64 {_JOB_Y}", "  store i64 %ybase, ptr %yp",
        "  %word = shl i64 %n, 20", "  store atomic i64 %word, ptr %job seq_cst, align 8",
        "  %t32 = trunc i64 %threads to i32",
        "  call void %parallel(ptr @openmp_body, ptr %job, i32 %t32, i32 0)", "  ret void", "}", "",
        # spin_probe: ``n`` idle rounds of the worker loop, for calibrating SPIN_SECONDS to rounds
        "define void @spin_probe(ptr %word, i64 %n) nounwind {",
        "entry:", "  br label %loop", "loop:", "  %i = phi i64 [0, %entry], [%i.next, %loop]",
        "  %w = load atomic i64, ptr %word seq_cst, align 8", pause, "  %i.next = add i64 %i, 1",
        "  %go = icmp ult i64 %i.next, %n", "  br i1 %go, label %loop, label %exit", "exit:", "  ret void", "}",
    ])



def openmp_parallel() -> int | None:
    """Address of ``GOMP_parallel`` of the GNU OpenMP runtime loaded in this process (torch's), or None where there
    is none (torch built without OpenMP or with another runtime, not Linux, torch not imported yet)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            function = ctypes.CDLL(path).GOMP_parallel  # already loaded: the same library, no second copy
        except (OSError, AttributeError):
            continue
        return ctypes.cast(function, ctypes.c_void_p).value
    return None


def runtime() -> dict[str, ctypes._CFuncPtr]:
    """The plan runner and the pool's loops, compiled on first use (~10 ms)."""
    def ir() -> str:
        pause_declaration, pause = _pause_ir(target_triple())
        return "\n\n".join([pause_declaration, _pool_ir(pause)])

    return compiled("pool", ir, lambda engine: {name: signature(engine.get_function_address(name))
                                                for name, signature in _ENTRY_POINTS.items()})


class Pool:
    """Worker threads that run posted plans in compiled code, spinning briefly between plans."""

    def __init__(self) -> None:
        self._entry = runtime()
        # libgomp is not fork-safe: a forked child's first team waits forever for the parent's threads (torch's own
        # ops too, which is why DataLoader workers run on one thread); a child keeps to this pool's workers
        self.openmp = openmp_parallel() if OPENMP and not _forked else None
        self.openmp_job = aligned_zeros(32)
        self.openmp_job_address = self.openmp_job.ctypes.data  # read at every plan: no numpy attribute in the call
        self.job = aligned_zeros(32)
        self.states = aligned_zeros(MAX_WORKERS * _STATE_STRIDE)
        self.threads: list[threading.Thread] = []
        self.events: list[threading.Event] = []
        self.lock = threading.Lock()
        self.spin = self._calibrate()

    def _calibrate(self) -> int:
        rounds = 20000
        start = time.perf_counter()
        self._entry["spin_probe"](self.job.ctypes.data + 8 * _JOB_STOP, rounds)
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
        loop = self._entry["worker_loop"]
        while loop(job, me, self.spin):  # ctypes releases the GIL for the whole native loop
            event.wait()
            event.clear()

    def run(self, plan: Plan, x_address: int, out_address: int, y_address: int = 0) -> None:
        """Run every task of the plan on the calling thread and up to ``plan.threads - 1`` workers."""
        threads = plan.threads
        if not self.lock.acquire(blocking=False):  # another Python thread's plan is running: do this one alone
            self._entry["run_records"](plan.records_address, 0, plan.n_records, x_address, out_address, y_address)
            return
        try:
            if self.openmp is not None:
                self._entry["run_openmp"](self.openmp, self.openmp_job_address, plan.tasks_address,
                                          plan.records_address, plan.n_tasks, x_address, out_address, y_address,
                                          threads)
                return
            self._grow(threads - 1)
            asleep = self._entry["post"](self.job.ctypes.data, self.states.ctypes.data, len(self.threads),
                                         plan.tasks_address, plan.records_address, plan.n_tasks, x_address, out_address,
                                         y_address)
            for i, event in enumerate(self.events[:threads - 1]):
                if asleep >> i & 1:
                    event.set()
            self._entry["finish"](self.job.ctypes.data, plan.n_tasks)
        finally:
            self.lock.release()

    def close(self) -> None:
        self.job[_JOB_STOP] = 1
        for event in self.events:
            event.set()
        for thread in self.threads:
            thread.join(timeout=1.0)


def get_pool() -> Pool:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = Pool()
    return _pool


def _shutdown() -> None:
    if _pool is not None:
        _pool.close()


def _forget_pool_in_child() -> None:
    global _pool, _pool_lock, _forked
    _pool, _pool_lock = None, threading.Lock()  # the child has none of the parent's threads
    _forked = True


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
        self.keep: object = None  # what the records point into, kept alive by the plan (set by its maker)
        self._run_records = runtime()["run_records"] if self.threads <= 1 else None

    def run(self, x_address: int, out_address: int, y_address: int = 0) -> None:
        """Run the plan with these bases added to the records' offsets (x, out and, for SDDMM records, dy; for SPMV
        records, where each row's sum starts: 0 for out itself)."""
        if self._run_records is not None:  # one thread: the runner called directly
            self._run_records(self.records_address, 0, self.n_records, x_address, out_address, y_address)
        else:
            get_pool().run(self, x_address, out_address, y_address)


