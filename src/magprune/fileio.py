"""Files room: the one way magprune writes a file — temp file in the same directory, fsync, rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def _create_temp(directory: Path, name: str) -> tuple[int, Path]:
    """A new file beside ``name`` opened for writing, with the permissions open() would give (0o666 less the umask,
    applied by the OS: mkstemp's own 0600 would hide run files from others, and reading the umask means setting it)."""
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename: never a half file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path.parent, path.name)
    except OSError as error:  # name the file the caller asked for, not the temp file
        raise OSError(error.errno, f"cannot write there ({error.strerror})", str(path)) from error
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
