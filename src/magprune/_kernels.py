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

BATCH_BLOCK = 64  # batch columns per pass: keeps the gathered input rows of a block in cache at large batch sizes
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


def _matmul_t(indptr, cols, vals, xt, bias, out):  # pragma: no cover - compiled
    """out[o, :] = bias[o] + sum_k vals[k] * xt[cols[k], :]: y^T = W x^T with the batch contiguous in memory."""
    n_rows = indptr.shape[0] - 1
    batch = xt.shape[1]
    for j0 in range(0, batch, BATCH_BLOCK):
        j1 = min(j0 + BATCH_BLOCK, batch)
        for o in prange(n_rows):
            b = bias[o]
            for j in range(j0, j1):
                out[o, j] = b
            for k in range(indptr[o], indptr[o + 1]):
                v = vals[k]
                c = cols[k]
                for j in range(j0, j1):
                    out[o, j] += v * xt[c, j]


def _conv(indptr, cols, vals, patches, bias, out):  # pragma: no cover - compiled
    """out[b, o, :] = bias[o] + sum_k vals[k] * patches[b, cols[k], :] (im2col convolution, all images at once)."""
    n_rows = indptr.shape[0] - 1
    positions = patches.shape[2]
    for task in prange(patches.shape[0] * n_rows):
        b = task // n_rows
        o = task % n_rows
        bo = bias[o]
        for j in range(positions):
            out[b, o, j] = bo
        for k in range(indptr[o], indptr[o + 1]):
            v = vals[k]
            c = cols[k]
            for j in range(positions):
                out[b, o, j] += v * patches[b, c, j]


_OPTIONS = {"fastmath": True, "cache": True, "nogil": True}
csr_matvec = njit(parallel=True, **_OPTIONS)(_matvec)
csr_matmul_t = njit(parallel=True, **_OPTIONS)(_matmul_t)
csr_conv = njit(parallel=True, **_OPTIONS)(_conv)
csr_matvec_serial = njit(**_OPTIONS)(_matvec)
csr_matmul_t_serial = njit(**_OPTIONS)(_matmul_t)
csr_conv_serial = njit(**_OPTIONS)(_conv)
