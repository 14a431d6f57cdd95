"""Kernels room (compile): LLVM IR compiled for the host CPU by llvmlite, once per process, and the host's facts.

llvmlite (numba's LLVM binding, PyPI wheels wherever torch has them; no C compiler needed) compiles IR for the host
CPU on first use; the object code is kept in :func:`cache_dir` for later processes (as numba's ``cache=True``: the
directory is trusted as the user's own, created mode 0700; each file carries its digest, so a truncated or damaged
one is compiled anew). Each kernel family (:mod:`.pool`, :mod:`.bitmask`, :mod:`.csr`) builds its own module through
:func:`compiled`, so training, which needs only the pool and the mask kernel, never compiles the products.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_engines: list = []  # keep the compiled code alive
_compiled: dict[str, Any] = {}


CACHE_ENV = "MAGPRUNE_KERNEL_CACHE"  # a directory for compiled kernels, or 0/off/false/no: compile every time
_MAGIC = b"magprune-kernel-object-v1\n"


def cache_dir() -> Path | None:
    """Where compiled kernels are kept between processes: ``$MAGPRUNE_KERNEL_CACHE``, else
    ``$XDG_CACHE_HOME/magprune/kernels`` (``~/.cache/magprune/kernels``); None when turned off."""
    given = os.environ.get(CACHE_ENV, "")
    if given.strip().lower() in ("0", "off", "false", "no"):
        return None
    try:
        if given:
            return Path(given).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "magprune" / "kernels"
    except RuntimeError:  # no home directory to be found (HOME unset, no passwd entry): compile every time
        return None


def _cache_path(ir: str, cpu: str, features: str, triple: str) -> Path | None:
    import llvmlite
    import llvmlite.binding as llvm

    directory = cache_dir()
    if directory is None:
        return None
    key = "\0".join([ir, cpu, features, triple, llvmlite.__version__, ".".join(map(str, llvm.llvm_version_info)),
                     "opt3"])
    return directory / f"{hashlib.sha256(key.encode()).hexdigest()}.o"


def _read_cached(path: Path | None) -> bytes | None:
    """The object code stored at ``path`` if the file is whole (its digest checks), else None."""
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + 32
    whole = len(data) > head and data.startswith(_MAGIC)
    if not whole or hashlib.sha256(data[head:]).digest() != data[len(_MAGIC):head]:
        return None
    return data[head:]


def _write_cached(path: Path | None, obj: bytes) -> None:
    """Store object code atomically (a temporary file renamed into place); a cache that cannot be written is
    skipped, never an error."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp.write_bytes(_MAGIC + hashlib.sha256(obj).digest() + obj)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _jit(ir: str):
    """Compile IR for the host CPU; returns the execution engine, which keeps the code alive.

    The object code is kept in :func:`cache_dir` under a digest of the IR, the host CPU and its features, the target
    triple and the llvmlite/LLVM versions: a later process loads it instead of optimizing and generating code again
    (0.3 s for the CSR products, 0.6 s for all the kernels, on this project's 2-core machines). A damaged file (its
    digest fails) is compiled anew and replaced."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
    path = _cache_path(ir, cpu, features, machine.triple)
    cached = _read_cached(path)
    module = llvm.parse_assembly(ir)
    module.verify()
    if cached is None:
        builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
        builder.getModulePassManager().run(module, builder)
    engine = llvm.create_mcjit_compiler(module, machine)
    # loaded: hand LLVM the cached object; compiled: store what it generates
    engine.set_object_cache(notify_func=None if cached is not None else lambda _module, obj: _write_cached(path, obj),
                            getbuffer_func=lambda _module: cached)
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
