"""What the two worker-process pools share: the sandbox's (`rstar.sandbox.pool`) and the
grader's (`rstar.grading`).

Both run untrusted or hang-prone work (model-written programs; math-verify on model answers)
in worker processes that are fresh interpreters, never forked from the search process (which
may hold torch and gigabytes of address space); both wait for a "ready" message before the
first request and kill and replace a worker that dies or overruns. Their protocols differ on
purpose and stay in their modules: the sandbox's worker answers one request at a time over
length-prefixed JSON frames (`rstar.sandbox.wire`, blocking reads with a deadline), while the
grader streams one JSON line per item of a batch to an event loop that times each item.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import IO

# How long a new worker may take to send "ready": importing sympy + numpy (sandbox) or
# sympy + math-verify (grader) takes 1-2 s; allow a loaded machine.
STARTUP_TIMEOUT_S = 120.0

# The source root of this `rstar`, put first on a worker's import path so that the worker
# imports the same code from a source checkout as from an installed package.
SRC_ROOT = str(Path(__file__).resolve().parent.parent)


def worker_command(module: str) -> list[str]:
    """argv of a fresh interpreter that runs `module._worker_main()` (the current directory is
    taken off its import path: a worker must not import files that lie where it was started)."""
    boot = (
        "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        f"sys.path.insert(0, {SRC_ROOT!r}); from {module} import _worker_main; _worker_main()"
    )
    return [sys.executable, "-c", boot]


def kill_process(proc: subprocess.Popen, *files: IO | None) -> None:
    """SIGKILL a worker, reap it, and close its pipes (and `files`, e.g. a stderr file)."""
    with contextlib.suppress(OSError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for f in (proc.stdin, proc.stdout, *files):
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.close()
