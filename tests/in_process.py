"""``magprune`` commands run through ``main()`` in the test process: the same code as the entry point, without a
fresh interpreter and torch import per call (the checks that need a real process keep one)."""

import contextlib
import io
import os
import subprocess
from pathlib import Path


def run_cli(*args: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """``magprune *args`` in this process (in ``cwd`` if given): its exit status and what it printed, as
    ``subprocess.run(..., capture_output=True, text=True)`` gives them."""
    from magprune.cli import main

    out, err, before = io.StringIO(), io.StringIO(), Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
