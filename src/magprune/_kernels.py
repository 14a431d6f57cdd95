"""Sparse room (kernels): numba CSR products used by the sparse inference modules.

numba rather than torch.sparse because torch's CSR kernels (and its invariant checks) need int32/int64 indices,
cannot run ``F.linear`` under ``inference_mode``, and stay 2-5x off the FLOP bound on a two-core CPU; numba
installs from PyPI wheels on every platform torch supports and compiles these few loops on first use (cached).
Each kernel comes parallel (prange over output rows) and serial: small products run serial, since waking threads
costs more than the work.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BATCH_BLOCK = 64  # at most this many batch columns per block
PARALLEL_MIN_WORK = 1 << 18  # multiply-adds below which the serial kernel is used


def _matvec(indptr, cols, vals, x, bias, out):  # pragma: no cover - compiled
    """out[o] = bias[o] + sum_k vals[k] * x[cols[k]] over row o's nonzeros (batch 1)."""
    for o in prange(indptr.shape[0] - 1):
        end = indptr[o + 1]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        k = indptr[o]
        # four independent accumulators hide the gather latency
        while k + 4 <= end:
            a0 += vals[k] * x[cols[k]]
            a1 += vals[k + 1] * x[cols[k + 1]]
            a2 += vals[k + 2] * x[cols[k + 2]]
            a3 += vals[k + 3] * x[cols[k + 3]]
            k += 4
        while k < end:
            a0 += vals[k] * x[cols[k]]
            k += 1
        out[o] = bias[o] + ((a0 + a1) + (a2 + a3))


def _matmul_t(indptr, cols, vals, xtb, bias, outb):  # pragma: no cover - compiled
    """outb[blk, o, :] = bias[o] + sum_k vals[k] * xtb[blk, cols[k], :]: y^T = W x^T, batch in blocks of columns.

    The batch is split into blocks (xtb has shape (blocks, in, width)) so each gathered input row is a short
    contiguous vector and one block of inputs stays in cache; rows and blocks are spread over the threads.
    """
    n_rows = indptr.shape[0] - 1
    width = xtb.shape[2]
    for task in prange(xtb.shape[0] * n_rows):
        blk = task // n_rows
        o = task % n_rows
        xb = xtb[blk]
        acc = np.empty(width, dtype=np.float32)  # a fresh buffer: the compiler can keep it apart from the inputs
        b = bias[o]
        for j in range(width):
            acc[j] = b
        k = indptr[o]
        end = indptr[o + 1]
        # four nonzeros per pass over the accumulator: a quarter of its loads and stores (measured ~1.4x faster)
        while k + 4 <= end:
            v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            x0, x1, x2, x3 = xb[cols[k]], xb[cols[k + 1]], xb[cols[k + 2]], xb[cols[k + 3]]
            for j in range(width):
                acc[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j])
            k += 4
        while k < end:
            v = vals[k]
            xr = xb[cols[k]]
            for j in range(width):
                acc[j] += v * xr[j]
            k += 1
        outb[blk, o, :] = acc


def _conv(indptr, cols, vals, patches, bias, out):  # pragma: no cover - compiled
    """out[b, o, :] = bias[o] + sum_k vals[k] * patches[b, cols[k], :] (im2col convolution, all images at once)."""
    n_rows = indptr.shape[0] - 1
    positions = patches.shape[2]
    for task in prange(patches.shape[0] * n_rows):
        b = task // n_rows
        o = task % n_rows
        pb = patches[b]
        acc = np.empty(positions, dtype=np.float32)
        bo = bias[o]
        for j in range(positions):
            acc[j] = bo
        k = indptr[o]
        end = indptr[o + 1]
        while k + 4 <= end:
            v0, v1, v2, v3 = vals[k], vals[k + 1], vals[k + 2], vals[k + 3]
            p0, p1, p2, p3 = pb[cols[k]], pb[cols[k + 1]], pb[cols[k + 2]], pb[cols[k + 3]]
            for j in range(positions):
                acc[j] += (v0 * p0[j] + v1 * p1[j]) + (v2 * p2[j] + v3 * p3[j])
            k += 4
        while k < end:
            v = vals[k]
            pr = pb[cols[k]]
            for j in range(positions):
                acc[j] += v * pr[j]
            k += 1
        out[b, o, :] = acc


_OPTIONS = {"fastmath": True, "cache": True, "nogil": True}
# no fastmath for the gather loop: it lets LLVM vectorize the sum with AVX-512 gathers, which are microcoded and
# measured ~5x slower than scalar loads on this AMD EPYC; four explicit accumulators give the parallelism instead
_GATHER_OPTIONS = {"fastmath": False, "cache": True, "nogil": True}
csr_matvec = njit(parallel=True, **_GATHER_OPTIONS)(_matvec)
csr_matmul_t = njit(parallel=True, **_OPTIONS)(_matmul_t)
csr_conv = njit(parallel=True, **_OPTIONS)(_conv)
csr_matvec_serial = njit(**_GATHER_OPTIONS)(_matvec)
csr_matmul_t_serial = njit(**_OPTIONS)(_matmul_t)
csr_conv_serial = njit(**_OPTIONS)(_conv)
