"""Kernels room (compile): LLVM IR compiled for the host CPU by llvmlite, once per process, and the host's facts.

llvmlite (numba's LLVM binding, PyPI wheels wherever torch has them; no C compiler needed) compiles IR for the host
CPU on first use. Each kernel family (:mod:`.pool`, :mod:`.bitmask`, :mod:`.csr`) builds its own module through
:func:`compiled`, so training, which needs only the pool and the mask kernel, never compiles the products.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_engines: list = []  # keep the compiled code alive
_compiled: dict[str, Any] = {}


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


def compiled(name: str, ir: Callable[[], str], symbols: Callable[[Any], Any]) -> Any:
    """The result of ``symbols(engine)`` for the module ``ir()`` compiled once per process under ``name``.

    ``symbols`` reads the function addresses it needs from the engine (the engine itself is kept alive here)."""
    found = _compiled.get(name)
    if found is None:
        with _lock:
            found = _compiled.get(name)
            if found is None:
                engine = _jit(ir())
                _engines.append(engine)
                found = _compiled[name] = symbols(engine)
    return found


def target_triple() -> str:
    import llvmlite.binding as llvm

    return llvm.get_process_triple()


def host_cpu() -> dict[str, Any]:
    """LLVM's name for the host CPU and its vector features (what the kernels are compiled for)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "amx-bf16",
              "neon", "sve")
    return {"llvm_host_cpu": llvm.get_host_cpu_name(),
            "llvm_features": sorted(f for f in wanted if features.get(f, False))}


@functools.cache
def vector_lanes() -> int:
    """Floats per vector register the kernels are built for: 16 where the host has AVX-512 (avx512f), else 8."""
    import llvmlite.binding as llvm

    return 16 if llvm.get_host_cpu_features().get("avx512f", False) else 8


def _forget_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a lock held by another thread of the parent would never be released in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_lock_in_child)
