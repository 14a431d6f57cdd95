"""Core room (environment): the facts about a machine that go with every measured result — CPU model, LLVM's name
for the host CPU and its vector features (what the kernels are compiled for), cores, memory, threads, versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU (model, LLVM host name and vector features), cores, memory, torch threads, where the kernels' threads come
    from, versions and load average."""
    from importlib.metadata import PackageNotFoundError, version

    import llvmlite
    import numpy
    import torch

    from magprune.kernels import pool
    from magprune.kernels.jit import host_cpu

    try:
        magprune_version = version("magprune")
    except PackageNotFoundError:  # run from a source tree that was never installed
        magprune_version = "unknown"

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": cpu_model(), **host_cpu(), "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "llvmlite": llvmlite.__version__, "magprune": magprune_version,
            # where the kernels' plans run: torch's OpenMP team or magprune's own workers (kernels.pool)
            "kernel_threads": "openmp" if pool.OPENMP and pool.openmp_parallel() is not None else "own",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def describe(info: dict[str, Any]) -> str:
    """One line for a results file: ``Intel(R) Xeon(R) ... (LLVM sapphirerapids: avx2, avx512f, ...), 2 cores, ...``.

    Reads older records too (a run's summary.json from before this module: ``cpu_count``, no LLVM facts)."""
    cpu = info.get("cpu") or info.get("processor") or "unknown CPU"
    if "llvm_host_cpu" in info:
        cpu += f" (LLVM {info['llvm_host_cpu']}: {', '.join(info.get('llvm_features', [])) or 'no wide vectors'})"
    parts = [cpu, f"{info.get('cores', info.get('cpu_count'))} cores"]
    if "memory_gib" in info:
        parts.append(f"{info['memory_gib']} GiB")
    parts.append(f"torch {info.get('torch')} ({info.get('torch_threads')} threads)")
    parts += [f"{k.capitalize() if k == 'python' else k} {info[k]}" for k in ("python", "llvmlite") if k in info]
    if "kernel_threads" in info:
        team = "torch's OpenMP team" if info["kernel_threads"] == "openmp" else "own threads"
        parts.append(f"kernels on {team} (OMP_WAIT_POLICY {info.get('OMP_WAIT_POLICY') or 'unset'})")
    return ", ".join(parts)
