"""Run model-written Python in a sandbox: one fresh forked process per program, warm workers.

The search never executes model code itself. A `SandboxPool` starts worker processes (fresh
interpreters, never forked from the search process, which may hold torch and gigabytes of
address space). Each worker imports what math programs need (math, fractions, sympy, numpy, ...)
once, isolates itself, and then forks one short-lived child per program. The child applies the
limits, drops privileges, runs the program in a fresh namespace and exits; nothing it changes
(globals, monkey-patched modules, the working directory) survives into the next program.

Isolation (details and what is NOT isolated: docs/sandbox.md):
- as root (how CI and our machines run): each worker lives in new PID, network, mount and IPC
  namespaces, is PID 1 there (so one `kill(-1)` removes everything a program left behind, and a
  program cannot signal it), sees a fresh root holding only the Python installation (read-only)
  and a private size-limited tmpfs on /tmp, /var/tmp and /dev/shm, and has no network (only a
  downed loopback). Programs run as a per-worker unprivileged uid, so RLIMIT_NPROC (which root
  ignores) holds.
- as a normal user: rlimits (which then apply), a private working directory, the worker as
  child subreaper for clean-up, and no network if unprivileged user namespaces are allowed.
- always (`sandbox.seccomp`, default on): a syscall filter (`syscalls`) denies sockets, new
  namespaces, ptrace, mounts, bpf, keyrings, perf, kexec and module loading with EPERM.

Limits on every program: wall time and CPU time, address space, processes, output bytes, file
size, open files; `sys.exit()`, `os._exit()`, crashes and limit hits come back as error results.

Output styles: "faithful" (default): stdout exactly as Python prints it (every print, exact big
integers). "authors": the observation the authors' executor (microsoft/rStar, rStar-math branch,
adapted from MARIO's `PythonInterpreter`) produced, so that a policy trained on their released
data sees what it learned from: float-only outputs rounded to 4 decimals (8.9443), several
top-level prints as `expr: value` runs, only the last statement's output when there is one print,
errors as `IndentationError: unexpected indent (<unknown>, line 20)`.

The pool is hand-written rather than pebble/multiprocessing: those run tasks *in* a long-lived
worker (state would leak between programs) and fork or spawn from the search process; here the
worker only forks and supervises, and the pool replaces a worker that dies or hangs.

Modules: `settings` (SandboxConfig), `pool` (SandboxPool, ExecResult and the pool's handles on
worker processes), `wire` (the pool <-> worker frames), `worker` (the worker process and the
program's process), `isolation` (namespaces, the minimal root, limits via libc), `syscalls` (the
seccomp filter), `styles` (the output styles, with the authors' executor re-implemented), `cli`
(`rstar exec`). The worker process starts as `python -c "from rstar.sandbox.worker import _worker_main; ..."` (`rstar.workers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rstar.sandbox.settings import (
    AUTHORS_MAX_CHARS,
    HEAVY_PRELOAD,
    ISOLATION_MODES,
    LIGHT_PRELOAD,
    OUTPUT_STYLES,
    SandboxConfig,
)

if TYPE_CHECKING:
    from rstar.sandbox.pool import ExecResult, SandboxPool, run_code
    from rstar.sandbox.styles import format_error

__all__ = [
    "AUTHORS_MAX_CHARS",
    "HEAVY_PRELOAD",
    "ISOLATION_MODES",
    "LIGHT_PRELOAD",
    "OUTPUT_STYLES",
    "ExecResult",
    "SandboxConfig",
    "SandboxPool",
    "format_error",
    "run_code",
]


def __getattr__(name: str) -> Any:
    # The pool (threads, subprocess) is loaded when first asked for: `rstar.config` reads only
    # the settings, and a worker process (`sandbox.worker`) never needs the pool at all.
    if name in ("ExecResult", "SandboxPool", "run_code"):
        from rstar.sandbox import pool

        return getattr(pool, name)
    if name == "format_error":
        from rstar.sandbox.styles import format_error

        return format_error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
