"""Run-directory room: the files of a run directory, each written atomically (metrics rows, per-stage checkpoints,
the resume checkpoint), its lock, and reading the resume checkpoint back safely."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from magprune.fileio import write_atomic

METRIC_FIELDS = ["stage", "step", "epoch", "lr", "train_loss", "train_error", "test_loss", "test_error",
                 "validation_error", "sparsity", "seconds"]
RESUME_FILE = "resume.pt"
RESUME_VERSION = 2  # 2: the position is a stage index and that stage's own state


class RunError(ValueError):
    """The run directory cannot be used (not writable, locked by another run, nothing to resume)."""


class RunWriter:
    """Appends metric rows to metrics.jsonl / metrics.csv and writes checkpoints, every file atomically."""

    def __init__(self, run_dir: Path, checkpoints: bool, enabled: bool = True, lock: Any = None) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.checkpoints = checkpoints and enabled
        self.enabled = enabled  # under DDP only rank 0 writes
        self.lock = lock  # from lock_run_dir, held until close()
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
        if self.checkpoints:
            (run_dir / "checkpoints").mkdir(exist_ok=True)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def write(self, name: str, data: bytes) -> None:
        if self.enabled:
            write_atomic(self.run_dir / name, data)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append({key: row.get(key) for key in METRIC_FIELDS})
        jsonl = "".join(json.dumps(r) + "\n" for r in self.rows)
        write_atomic(self.run_dir / "metrics.jsonl", jsonl.encode())
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.run_dir / "metrics.csv", buffer.getvalue().encode())

    def resume_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.checkpoints:  # output.checkpoints: false trades crash safety for disk
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_atomic(self.run_dir / "checkpoints" / RESUME_FILE, buffer.getvalue())

    def checkpoint(self, stage: str, model: nn.Module, masks: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if not self.checkpoints:
            return
        base = self.run_dir / "checkpoints"
        tensors = {f"model.{k}": v for k, v in plain(model.state_dict()).items()}
        tensors.update({f"mask.{k}": v for k, v in plain(masks).items()})
        write_atomic(base / f"{stage}.safetensors", save_safetensors(tensors))
        write_json(base / f"{stage}.json", meta)


def plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (what safetensors and a checkpoint store)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def lock_run_dir(run_dir: Path) -> Any:
    """Take RUN_DIR/.lock (an flock, released by the kernel when the process dies, even by SIGKILL); a second run
    on the same directory is refused instead of corrupting the first."""
    import fcntl

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - must stay open for the whole run
    except OSError as exc:
        raise RunError(f"run directory {run_dir} is not usable: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise RunError(f"run directory {run_dir} is in use by another magprune run (lock {run_dir / '.lock'}); "
                       "wait for it or choose another --out") from exc
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def check_writable(run_dir: Path, probe_bytes: int = 1 << 20) -> None:
    """Write (and remove) a 1 MiB probe file, so an unwritable or full directory fails before any training."""
    probe = run_dir / ".write-probe"
    try:
        write_atomic(probe, b"\0" * probe_bytes)
        probe.unlink()
    except OSError as exc:
        raise RunError(f"run directory {run_dir} is not writable: {exc.strerror or exc}") from exc


def load_resume_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The last complete checkpoint of ``run_dir`` (None if the run never wrote one), loaded safely."""
    path = run_dir / "checkpoints" / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why, never unpickle code
        raise RunError(f"{path}: not a readable magprune checkpoint ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or state.get("version") != RESUME_VERSION:
        raise RunError(f"{path}: not a magprune resume checkpoint of version {RESUME_VERSION}")
    return state
