"""Sparse room (kernels): numba CSR products used by the sparse inference modules.

numba rather than torch.sparse because torch's CSR kernels (and its invariant checks) need int32/int64 indices,
cannot run ``F.linear`` under ``inference_mode``, and stay 2-5x off the FLOP bound on a two-core CPU; numba
installs from PyPI wheels on every platform torch supports and compiles these few loops on first use (cached).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

BATCH_BLOCK = 64  # batch columns per pass: keeps the gathered input rows of a block in cache at large batch sizes


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def csr_matvec(indptr, cols, vals, x, bias, out):  # pragma: no cover - compiled
    """out[o] = bias[o] + sum_k vals[k] * x[cols[k]] over row o's nonzeros (batch 1)."""
    for o in prange(indptr.shape[0] - 1):
        start = indptr[o]
        end = indptr[o + 1]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        k = start
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


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def csr_matmul_t(indptr, cols, vals, xt, bias, out):  # pragma: no cover - compiled
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
