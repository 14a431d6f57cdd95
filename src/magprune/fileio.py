"""Files room: the one way magprune writes a file — temp file in the same directory, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's own 0600 would hide run files from others


def write_atomic(path: str | os.PathLike[str], data: bytes, *,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename: never a half file.

    ``before_replace`` runs between the fsync and the rename (the crash tests kill the process there).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:  # name the file the caller asked for, not the temp file
        raise OSError(error.errno, f"cannot write there ({error.strerror})", str(path)) from error
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
