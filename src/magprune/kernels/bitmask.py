"""Kernels room (training masks): set the dropped entries of a 32-bit tensor from a keep-mask packed 1 bit per entry.

``mask_fill``: ``t[j] = fill`` wherever bit j of a packed keep-mask is clear (the pruner's gradient masking in
training: a 1-bit mask is 1/32 of the fp32 mask that torch would multiply by, so a masked gradient costs one pass
over the gradient and almost none over the mask).
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np

from magprune.kernels.jit import compiled
from magprune.kernels.pool import CHUNKS_PER_THREAD, MASK, RECORD, Plan

PARALLEL_MIN_MASKED = 1 << 21  # entries of a masked fill (8 MiB of fp32: a pass over it takes longer than a wake-up)
_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


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



def _kernel() -> tuple[int, ctypes._CFuncPtr]:
    """(address, callable) of ``mask_fill``, compiled on first use."""
    def symbols(engine):
        address = engine.get_function_address("mask_fill")
        return address, _SIGNATURE(address)

    return compiled("bitmask", _mask_ir, symbols)


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
        fn, call = _kernel()
        if threads <= 1 or self.numel < PARALLEL_MIN_MASKED:
            call(address, self.bits.ctypes.data, self.numel, fill_bits)
            return
        key = (threads, fill_bits)
        plan = self._plans.get(key)
        if plan is None:
            bits = self.bits.ctypes.data
            parts = threads * CHUNKS_PER_THREAD
            # chunks start on mask bytes (multiples of 8 entries); the last one takes the tail
            cuts = sorted({8 * ((self.numel // 8) * i // parts) for i in range(parts)} | {self.numel})
            records = [[[MASK, fn, bits + a // 8, b - a, fill_bits, 0, 4 * a] + [0] * (RECORD - 7)]
                       for a, b in itertools.pairwise(cuts)]
            plan = self._plans[key] = Plan(records, threads)
        plan.run(address, 0)


