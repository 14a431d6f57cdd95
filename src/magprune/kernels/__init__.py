"""Kernels wing: compiled products and masks (LLVM IR through llvmlite) on a native thread pool.

The lowest layer: numpy and llvmlite only, no knowledge of torch models. Used by the core (1-bit gradient masking,
:mod:`.bitmask`) and by deploy (sparse inference, :mod:`.csr`). Rooms: :mod:`.jit` (compile once per process, host
CPU facts), :mod:`.pool` (plans and worker threads), :mod:`.memory` (huge pages, alignment), one file per kernel
family.
"""

from magprune.kernels.bitmask import BitMask
from magprune.kernels.csr import CSRProduct
from magprune.kernels.jit import host_cpu

__all__ = ["BitMask", "CSRProduct", "host_cpu"]
