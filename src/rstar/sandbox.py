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
  program cannot signal it), sees the host file system read-only with a private size-limited
  tmpfs on /tmp, /var/tmp and /dev/shm, and has no network (only a downed loopback). Programs run
  as a per-worker unprivileged uid, so RLIMIT_NPROC (which root ignores) holds.
- as a normal user: rlimits (which then apply), a private working directory, the worker as
  child subreaper for clean-up, and no network if unprivileged user namespaces are allowed.

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
"""

from __future__ import annotations

import argparse
import ast
import builtins
import concurrent.futures as cf
import contextlib
import ctypes
import gc
import io
import itertools
import json
import math
import mmap
import os
import queue
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

OUTPUT_STYLES = ("faithful", "authors")
ISOLATION_MODES = ("auto", "rlimits")

# Imported by every worker before it forks programs, so programs find them loaded. Fork time
# grows with the worker's memory, so "light" workers import only common math modules; programs
# that mention numpy/sympy/mpmath go to "heavy" workers. Other modules are imported by the program
# itself (in the namespace sandbox the interpreter stays readable after the privilege drop).
LIGHT_PRELOAD: tuple[str, ...] = (
    "math", "cmath", "fractions", "decimal", "statistics", "random", "itertools", "functools",
    "operator", "collections", "heapq", "bisect", "string", "re", "datetime",
)  # fmt: skip
HEAVY_PRELOAD: tuple[str, ...] = ("numpy", "sympy", "mpmath", "secrets")
# Run once in each worker after the imports: sympy imports much of itself lazily and fills caches
# on first use (a first `solve` takes ~90 ms, later ones ~5 ms); without this every forked
# program would pay that again. Only pure computations: no state a program could observe.
_WARMUP = {
    "sympy": """
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(x**2 - 5*x + 6, x); sp.solve([x + y - 3, x - y - 1], [x, y]); sp.solveset(x**2 - 4, x)
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.factor(x**2 - 1); sp.expand((x + 1)**3)
sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.sin(x), x); sp.limit(sp.sin(x)/x, x, 0)
sp.summation(x, (x, 1, 10)); sp.nsimplify(0.5); sp.N(sp.pi, 20); sp.sqrt(8); sp.Rational(1, 3) + 1
sp.factorint(360); sp.isprime(97); list(sp.primerange(1, 20)); sp.binomial(10, 3); sp.gcd(12, 18)
sp.Matrix([[1, 2], [3, 4]]).det(); sp.Matrix([[1, 2], [3, 4]]).inv(); sp.Poly(x**2 + 1, x).all_coeffs()
sp.latex(x**2); str(sp.Eq(x, 1)); sp.nsolve(x**2 - 2, x, 1); sp.Abs(-x).subs(x, 2); sp.floor(sp.Rational(7, 2))
""",
    "numpy": """
import numpy as np
a = np.arange(12).reshape(3, 4); a.sum(); a.mean(); np.linalg.det(np.eye(3)); np.roots([1, -3, 2])
np.linspace(0, 1, 5); np.sqrt(a); np.array([1.5]).round(2); str(a); np.random.default_rng(0).random(3)
""",
    "fractions": "from fractions import Fraction\nstr(Fraction(1, 3) + Fraction(1, 6))",
    "statistics": "import statistics\nstatistics.mean([1, 2, 3]); statistics.median([1, 2, 3])",
}

# Without a mount namespace, a worker that drops root cannot read an interpreter installed under
# a private directory (/root, mode 700) any more: it imports these and every codec up front.
FALLBACK_PRELOAD: tuple[str, ...] = (
    "numbers", "array", "copy", "textwrap", "unicodedata", "calendar", "time", "_strptime", "json",
    "typing", "dataclasses", "enum", "pprint", "struct", "hashlib", "base64", "binascii", "zlib",
    "pickle", "traceback", "warnings", "contextlib", "socket", "subprocess", "threading", "signal",
    "locale", "io", "timeit", "secrets", "inspect", "tokenize", "keyword", "ast", "glob", "tempfile",
    "shutil", "csv", "gc", "weakref", "abc", "platform", "difflib", "fnmatch",
)  # fmt: skip

# The authors' executor (rStar-math `python_tool.py`, from MARIO's PythonInterpreter) cut each
# observation to this many characters (first half + "..." + last half).
AUTHORS_MAX_CHARS = 1024
_AUTHORS_TIMEOUT_MESSAGE = "Execution of the code snippet has timed out for exceeding {:g} seconds."

_STARTUP_TIMEOUT_S = 120.0  # importing sympy + numpy takes ~1 s; allow a loaded machine
_BACKSTOP_S = 10.0  # the pool kills a worker that has not answered timeout_s + this after a request
_TRUNCATION_MARKER = "\n[... output truncated: more than {} bytes]"
_MAX_MESSAGE_CHARS = 2000  # error messages (a KeyError of a huge key) are cut to this
_UID_BASE = 600_000_000  # sandbox uids are taken from here up (to ~1.24e9): no real accounts there


@dataclass
class SandboxConfig:
    """Limits of one program run and the shape of the pool.

    timeout_s: wall-clock limit of one program; CPU time is limited to the same (rounded up).
    memory_mb: address space a program may add on top of the warm interpreter it is forked from.
    max_output_bytes: stdout beyond this is cut (with a marker) and the run is an error.
    max_file_bytes: largest file a program may write (RLIMIT_FSIZE).
    max_processes: processes a program may have at once, itself included (RLIMIT_NPROC).
    workers: programs run at the same time.
    output_style: "faithful" (what Python prints) or "authors" (their executor's observations).
    isolation: "auto" (namespaces where the platform allows) or "rlimits" (rlimits, a private
        working directory and, as root, the privilege drop only).
    light_workers: route programs that do not mention numpy/sympy/mpmath to workers that did not
        import them (a fork of a small interpreter is cheaper); False = every worker is heavy.
    preload: modules every worker imports before forking programs.
    heavy_preload: modules heavy workers import as well.
    tmpfs_mb: size of the private /tmp (namespaces only).
    authors_max_chars: output cut of the authors' style (their `truncate_string`).
    """

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 64_000
    max_file_bytes: int = 1_000_000
    max_processes: int = 16
    workers: int = 2
    output_style: str = "faithful"
    isolation: str = "auto"
    light_workers: bool = True
    preload: tuple[str, ...] = LIGHT_PRELOAD
    heavy_preload: tuple[str, ...] = HEAVY_PRELOAD
    tmpfs_mb: int = 64
    authors_max_chars: int = AUTHORS_MAX_CHARS

    def __post_init__(self) -> None:
        if self.output_style not in OUTPUT_STYLES:
            raise ValueError(f"output_style must be one of {OUTPUT_STYLES}, got {self.output_style!r}")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.workers < 1 or self.max_processes < 1:
            raise ValueError("timeout_s, memory_mb, workers and max_processes must be positive")
        self.preload = tuple(self.preload)
        self.heavy_preload = tuple(self.heavy_preload)


@dataclass
class ExecResult:
    """The outcome of one program run.

    error_type is a Python exception name ("NameError", "MemoryError", "SystemExit", ...) or one
    of the sandbox's own: "TimeoutError" (wall or CPU limit; timed_out is True),
    "OutputLimitExceeded", "Crash" (killed by a signal, e.g. a segfault from runaway recursion),
    "SandboxError" (the sandbox itself failed, e.g. its worker was killed).
    """

    ok: bool
    stdout: str  # everything printed (truncated to the output limit, with a marker)
    error_type: str | None = None
    error_message: str | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    output_style: str = "faithful"

    def observation(self) -> str:
        """The text between <output> and <end_of_output>: stdout if ok, else the error.

        Surrounding whitespace is stripped, as the authors' pipeline did; `stdout` keeps it."""
        if self.ok:
            return self.stdout.strip()
        return format_error(self.error_type or "Error", self.error_message or "", self.output_style)


def format_error(error_type: str, message: str, output_style: str = "faithful") -> str:
    """One line for an error, as Python's last traceback line ("faithful") or as the authors'
    executor wrote it ("authors": `"{}: {}".format(type, str(e))`, and its timeout exception
    printed its message with quotes)."""
    if output_style == "authors":
        if error_type == "TimeoutError" and message.startswith("Execution of the code snippet"):
            return f"TimeoutError: {message!r}"
        return f"{error_type}: {message}".strip()
    return f"{error_type}: {message}" if message else error_type


# ---------------------------------------------------------------------------------------------
# The pool (runs in the search process; imports nothing heavy)
# ---------------------------------------------------------------------------------------------

_HEAVY_WORDS = re.compile(r"\b(?:numpy|sympy|mpmath)\b")
_POOL_IDS = itertools.count()


class SandboxPool:
    """Warm sandbox workers. `submit` is non-blocking and thread-safe.

    With `light_workers`, `workers` light and `workers` heavy worker processes exist (light ones
    for programs that do not mention numpy/sympy/mpmath; `eager` starts the light ones at once,
    a heavy one starts at its first program), but at most `workers` programs run at once. A
    worker that dies or hangs is replaced; its program gets a "SandboxError" result.
    """

    def __init__(self, config: SandboxConfig | None = None, eager: bool = True):
        self.config = config or SandboxConfig()
        kinds = ["light", "heavy"] if self.config.light_workers else ["heavy"]
        self._queues: dict[str, queue.SimpleQueue] = {k: queue.SimpleQueue() for k in kinds}
        self._slots = threading.BoundedSemaphore(self.config.workers)
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._threads: list[threading.Thread] = []
        # Each worker's programs run as their own uid (root only), unique to this pool: RLIMIT_NPROC
        # then counts exactly one program's processes, and programs cannot signal each other.
        uid_base = _UID_BASE + ((os.getpid() % 100_000) * 100 + next(_POOL_IDS) % 100) * 64
        for k_index, kind in enumerate(kinds):
            # Beside light workers, heavy ones start at their first program: most searches (the
            # embedded world's, say) never import numpy/sympy, and a heavy worker still importing
            # them when the pool closes holds the close up for its whole start (~2 s).
            start_now = eager and (kind == "light" or len(kinds) == 1)
            for i in range(self.config.workers):
                w = _Worker(self.config, kind, uid=uid_base + k_index * 32 + i % 32, eager=start_now)
                self._workers.append(w)
                t = threading.Thread(target=self._serve, args=(w, self._queues[kind]), daemon=True)
                t.name = f"sandbox-{kind}-{i}"
                t.start()
                self._threads.append(t)
        # Kill the worker processes even if close() is never called.
        self._finalizer = weakref.finalize(self, _kill_all, list(self._workers))

    # -- public API ---------------------------------------------------------------------------
    def submit(self, code: str) -> cf.Future[ExecResult]:
        fut: cf.Future[ExecResult] = cf.Future()
        kind = "light" if "light" in self._queues and not _HEAVY_WORDS.search(code) else "heavy"
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is closed")
            self._queues[kind].put((code, fut))
        return fut

    def run(self, code: str) -> ExecResult:
        return self.submit(code).result()

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        futures = [self.submit(c) for c in codes]
        return [f.result() for f in futures]

    @property
    def isolation(self) -> dict:
        """What the workers isolate, as the first worker to start reports it (blocks until then)."""
        w = self._workers[0]
        if w.report:
            return dict(w.report)
        with w.lock:
            w.ensure_started()
            return dict(w.report)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for q in self._queues.values():
                # Programs not started yet are cancelled; the running ones finish first.
                while True:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    item[1].cancel()
                for _ in range(self.config.workers):
                    q.put(None)
        for t in self._threads:
            t.join(timeout=self.config.timeout_s + _BACKSTOP_S + 5)
        for w in self._workers:
            w.stop()
        self._finalizer.detach()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _serve(self, worker: _Worker, q: queue.SimpleQueue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            code, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            with self._slots:
                try:
                    with worker.lock:
                        result = worker.run(code)
                except BaseException as e:  # never leave a future unresolved
                    result = _sandbox_error(f"{type(e).__name__}: {e}", self.config.output_style)
            fut.set_result(result)


def run_code(code: str, config: SandboxConfig | None = None) -> ExecResult:
    """Run one program (starts and stops a worker: use a SandboxPool for many)."""
    cfg = config or SandboxConfig()
    one = SandboxConfig(**{**cfg.__dict__, "workers": 1})
    with SandboxPool(one, eager=False) as pool:
        return pool.run(code)


def _sandbox_error(message: str, output_style: str, duration_s: float = 0.0) -> ExecResult:
    return ExecResult(False, "", "SandboxError", message, False, duration_s, output_style)


class _Worker:
    """The pool's handle on one worker process (used by one pool thread at a time)."""

    def __init__(self, cfg: SandboxConfig, kind: str, uid: int, eager: bool):
        self.cfg = cfg
        self.kind = kind
        self.uid = uid
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.report: dict = {}
        if eager:
            self._spawn()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _spawn(self) -> None:
        src = str(Path(__file__).resolve().parent.parent)  # so the worker imports this rstar
        spec = {
            "kind": self.kind,
            "uid": self.uid,
            "src": src,
            "preload": list(self.cfg.preload)
            + (list(self.cfg.heavy_preload) if self.kind == "heavy" else []),
            **{k: v for k, v in self.cfg.__dict__.items() if k not in ("preload", "heavy_preload")},
        }
        boot = (
            "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            f"sys.path.insert(0, {src!r}); from rstar.sandbox import _worker_main; _worker_main()"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_env(self.kind),
            cwd="/",
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in the terminal goes to the search, not the workers
        )
        self.ready = False

    def ensure_started(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()
        if not self.ready:
            assert self.proc is not None and self.proc.stdout is not None
            msg = _recv(self.proc.stdout.fileno(), time.monotonic() + _STARTUP_TIMEOUT_S)
            if not msg.get("ready"):
                raise RuntimeError(f"sandbox worker failed to start: {msg.get('error')}")
            self.report = msg["isolation"]
            self.ready = True

    def run(self, code: str) -> ExecResult:
        t0 = time.monotonic()
        try:
            self.ensure_started()
        except (OSError, EOFError, TimeoutError, RuntimeError, ValueError) as e:
            self.kill()
            return _sandbox_error(f"could not start a sandbox worker: {e}", self.cfg.output_style)
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            _send(self.proc.stdin.fileno(), {"code": code})
            msg = _recv(self.proc.stdout.fileno(), time.monotonic() + self.cfg.timeout_s + _BACKSTOP_S)
            return ExecResult(**msg)
        except (OSError, EOFError, TimeoutError, ValueError, TypeError) as e:
            # The worker died (killed from outside, OOM killer) or hung: replace it. The program
            # gets an error, not the pool.
            self.kill()
            self._spawn()
            what = "hung" if isinstance(e, TimeoutError) else "died"
            return _sandbox_error(
                f"the sandbox worker {what} while running this program ({type(e).__name__}); replaced it",
                self.cfg.output_style,
                time.monotonic() - t0,
            )

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)
            for f in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(Exception):
                    f.close()
        self.proc = None
        self.ready = False

    def stop(self) -> None:
        """Close the request pipe (the worker exits on EOF, taking its namespace with it)."""
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()


def _worker_env(kind: str) -> dict[str, str]:
    """A small environment: the search process's (API keys, tokens) is not passed on."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONIOENCODING": "utf-8",
        # No BLAS threads: a forked child cannot use its parent's threads anyway, and each one
        # would reserve address space counted by RLIMIT_AS.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
    }
    if kind == "heavy":
        # Fork time grows with the pages the parent has mapped. With Python objects allocated by
        # glibc malloc on transparent huge pages, the ~50 MB heap of the sympy+numpy worker is a
        # few dozen huge-page entries instead of ~12,000 small ones (measured: fork + exit ~2x
        # faster). Light workers are too small to gain from it.
        env["PYTHONMALLOC"] = "malloc"
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    return env


# -- framing: 4-byte big-endian length + UTF-8 JSON ---------------------------------------------


def _send(fd: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _recv(fd: int, deadline: float | None = None) -> dict:
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    return json.loads(_read_exact(fd, n, deadline))


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    poller = select.poll()  # not select(): the search process may hold descriptors past 1024
    poller.register(fd, select.POLLIN)
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
                raise TimeoutError("no answer from the sandbox worker")
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError("sandbox worker closed its pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The worker (a fresh interpreter started by the pool)
# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38


def _check_libc(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _cstr(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    ret = _libc.mount(_cstr(source), _cstr(target), _cstr(fstype), flags, _cstr(data))
    _check_libc(ret, f"mount {target}")


@dataclass
class _WorkerState:
    spec: dict
    proto_in: int
    proto_out: int
    devnull: int
    shm: mmap.mmap
    workdir: str
    scratch: list[str]  # directories emptied after each program
    in_pidns: bool  # PID 1 of its own PID namespace: kill(-1) reaches exactly the programs
    drop_uid: int | None
    limits: list[tuple[int, int]] = field(default_factory=list)
    stdio: tuple = ()
    report: dict = field(default_factory=dict)


def _worker_main() -> None:
    spec = json.loads(sys.argv[1])
    # The protocol pipes move to private descriptors; fd 0/1 become harmless, so a stray print
    # in the worker cannot corrupt the protocol.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    try:
        state = _worker_setup(spec, proto_in, proto_out, devnull)
    except BaseException as e:
        with contextlib.suppress(OSError):
            _send(proto_out, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        raise
    _send(proto_out, {"ready": True, "isolation": state.report})
    _worker_loop(state)


def _worker_setup(spec: dict, proto_in: int, proto_out: int, devnull: int) -> _WorkerState:
    is_root = os.geteuid() == 0
    report: dict = {"kind": spec["kind"]}
    # Counted before any user namespace, where other users' processes would show as "nobody".
    user_processes = 0 if is_root else _count_user_processes(os.getuid())
    ns_ok = False
    if spec["isolation"] == "auto":
        if is_root:
            ns_ok = _enter_root_namespaces(spec, report)  # forks: from here on we may be PID 1
        else:
            _enter_user_network_namespace(report)
    # Imports come after the fork above, so the process that only waits stays small.
    preload = list(spec["preload"])
    if is_root and not ns_ok and _interpreter_exposures():
        preload += FALLBACK_PRELOAD
    failed = []
    for name in preload:
        try:
            __import__(name)
        except Exception:
            failed.append(name)
    if is_root and not ns_ok and _interpreter_exposures():
        _import_all_encodings()
    report["preload_failed"] = failed
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for module, code in _WARMUP.items():
            if module in sys.modules:
                try:
                    exec(code, {"__name__": "__warmup__"})
                except Exception as e:  # a newer sympy may differ; warm-up is only for speed
                    report.setdefault("warmup_failed", []).append(f"{module}: {type(e).__name__}")
    in_pidns = ns_ok and os.getpid() == 1
    # The working directory sits in a directory the program cannot write, so it cannot swap it
    # for a symlink that the worker's clean-up (as root) would follow.
    if in_pidns:
        base = "/tmp/.rstar"
        os.makedirs(base, exist_ok=True)
        scratch = ["/tmp", "/var/tmp", "/dev/shm"]
    else:
        base = tempfile.mkdtemp(prefix="rstar-sandbox-")
        scratch = []
    os.chmod(base, 0o711)
    workdir = os.path.join(base, "work")
    os.makedirs(workdir, exist_ok=True)
    if not in_pidns:
        # Orphans of a program (daemonized grandchildren) are re-parented to us, so we can find
        # and kill them after the program ends.
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    drop_uid = None
    if is_root:
        drop_uid = _usable_uid(spec["uid"])
        os.chown(workdir, drop_uid, drop_uid)
    os.chmod(workdir, 0o700)
    os.environ.update({"HOME": workdir, "TMPDIR": workdir, "PWD": workdir})

    vm_bytes = _vm_size()
    cpu = max(1, math.ceil(spec["timeout_s"]))
    nproc = spec["max_processes"]
    if drop_uid is None:
        # Not root: RLIMIT_NPROC counts every process of this user, so allow what is running now
        # plus the program's own budget.
        nproc += user_processes
    # Limits the worker itself can carry are set once here and inherited by every program (the
    # worker writes no files, keeps a few descriptors, and as root is exempt from RLIMIT_NPROC);
    # only the CPU limit, which counts from each fork, is set per program.
    for lim, value in (
        (resource.RLIMIT_AS, vm_bytes + spec["memory_mb"] * 2**20),
        (resource.RLIMIT_FSIZE, spec["max_file_bytes"]),
        (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(lim, (value, value))
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot give privileges back
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises OSError instead
    limits = [(resource.RLIMIT_CPU, cpu)]
    report.update(
        {
            "mode": "namespaces" if ns_ok else "rlimits",
            "user": (f"uid {drop_uid} (dropped from root)" if drop_uid is not None else "the calling user"),
            "nproc_limit": (
                f"{nproc} processes of the sandbox uid"
                if drop_uid is not None
                else f"{nproc} processes of the user (the {spec['max_processes']} allowed plus "
                "those running when the worker started)"
            ),
            "uid": drop_uid if drop_uid is not None else os.getuid(),
            "pid_namespace": in_pidns,
            "workdir": workdir,
            "address_space_mb": round((vm_bytes + spec["memory_mb"] * 2**20) / 2**20),
        }
    )
    report.setdefault("network_isolated", False)
    report.setdefault("filesystem", "host file system (write access as the program's user)")
    # The programs' stdio objects, made once: each child only points fd 0/1/2 elsewhere. stdout is
    # unbuffered (as `python -u`), so what was printed before a timeout or os._exit() is kept.
    stdio = (
        io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8"),
        io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True),
        io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", write_through=True),
    )
    # A shared page for the child's verdict: no descriptor to leak, nothing to parse if it dies.
    size = 4 * spec["max_output_bytes"] + 64 * 1024
    shm = mmap.mmap(-1, size)
    # Objects that exist now are never collected in a child: fewer pages touched (copied) there.
    gc.collect()
    gc.freeze()
    return _WorkerState(
        spec, proto_in, proto_out, devnull, shm, workdir, scratch, in_pidns, drop_uid, limits, stdio, report
    )


def _import_all_encodings() -> None:
    import encodings
    import pkgutil

    for mod in pkgutil.iter_modules(encodings.__path__):
        with contextlib.suppress(Exception):
            __import__(f"encodings.{mod.name}")


def _enter_root_namespaces(spec: dict, report: dict) -> bool:
    """New PID, network, mount and IPC namespaces; a read-only view of the host with a private
    tmpfs on /tmp, /var/tmp and /dev/shm. Forks: the caller continues as PID 1 of the new PID
    namespace, while the original process only waits for it (and passes on its exit status)."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWIPC
    if _libc.unshare(flags) != 0:
        report["namespace_error"] = os.strerror(ctypes.get_errno())
        return False
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    exposures = _interpreter_exposures()
    sources = {path: os.open(path, os.O_PATH) for paths in exposures.values() for path in paths}
    not_ro = []
    for mount_point, opts in _mount_points():
        if mount_point == "/proc" or mount_point.startswith("/proc/"):
            continue
        keep = sum(
            f for o, f in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC)) if o in opts
        )
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError:
            not_ro.append(mount_point)
    # The interpreter may live under a directory the sandbox uid cannot enter (/root, mode 700):
    # cover that directory with an empty tmpfs holding bind mounts of just the interpreter's
    # directories, so lazy imports work after the privilege drop and the rest stays hidden.
    for hidden, paths in exposures.items():
        _mount("tmpfs", hidden, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for path in paths:
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{sources[path]}", path, None, MS_BIND | MS_REC)
            with contextlib.suppress(OSError):
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        _mount(None, hidden, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        report["hidden"] = report.get("hidden", []) + [hidden]
    for fd in sources.values():
        os.close(fd)
    # The private /tmp below would hide an interpreter or virtual environment that lives
    # under it (a checkout in /tmp, as CI may use): keep handles on those directories and
    # bind them back, read-only, into the new tmpfs.
    private = ("/tmp", "/var/tmp", "/dev/shm")
    below = _topmost(
        [p for p in _interpreter_dirs() if any(p == d or p.startswith(d + "/") for d in private)]
    )
    kept = {path: os.open(path, os.O_PATH) for path in below}
    _PRESERVED[:] = below  # the scratch cleaner must leave them (and the directories above them) alone
    size = f"size={spec['tmpfs_mb']}m,nr_inodes=8192,mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size)
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            host = "/tmp/.shm" if path == "/dev/shm" else "/tmp/.vartmp"
            os.makedirs(host, exist_ok=True)
            os.chmod(host, 0o1777)
            with contextlib.suppress(OSError):
                _mount(host, path, None, MS_BIND)
    for path, fd in kept.items():
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        with contextlib.suppress(OSError):
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(fd)
    pid = os.fork()
    if pid:  # the original process: wait for PID 1 and exit with it
        os.closerange(3, 1 << 16)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):  # a /proc that shows only this namespace's processes
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    report["network_isolated"] = True
    report["filesystem"] = (
        "host file system read-only; private tmpfs on /tmp, /var/tmp, /dev/shm "
        f"({spec['tmpfs_mb']} MB), emptied after each program"
    )
    if not_ro:
        report["filesystem"] += f"; could not make read-only: {', '.join(not_ro)}"
    return True


# Interpreter directories bound back into the private /tmp (set in the worker's namespace).
_PRESERVED: list[str] = []


def _interpreter_dirs() -> list[str]:
    """The real paths of the interpreter's prefixes and import path (what programs import from)."""
    wanted = {sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix}
    wanted |= {p for p in sys.path if p and os.path.isdir(p)}
    return sorted({os.path.realpath(p) for p in wanted})


def _topmost(paths: list[str]) -> list[str]:
    """Drop the paths that lie inside another one (a bind mount of /a/b already holds /a/b/c)."""
    return [p for p in sorted(paths) if not any(p != q and p.startswith(q + "/") for q in paths)]


def _interpreter_exposures() -> dict[str, list[str]]:
    """{directory others cannot enter: [the interpreter's directories below it]}."""
    out: dict[str, set[str]] = {}
    for path in _interpreter_dirs():
        parts = Path(path).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            if os.stat(ancestor).st_mode & 0o005 != 0o005:
                if ancestor != path:
                    out.setdefault(ancestor, set()).add(path)
                break
    return {hidden: _topmost(list(paths)) for hidden, paths in out.items()}


def _enter_user_network_namespace(report: dict) -> None:
    """Not root: an unprivileged user namespace, if the kernel allows one, gives an empty
    network namespace (identity-mapped, so files keep their owner)."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        report["namespace_error"] = os.strerror(ctypes.get_errno())
        return
    try:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        report["network_isolated"] = True
    except OSError as e:
        report["namespace_error"] = str(e)


def _mount_points() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
            out.append((mp, parts[5]))
    return out


def _usable_uid(uid: int) -> int:
    """The per-worker uid if this user namespace maps it, else nobody."""
    try:
        for line in Path("/proc/self/uid_map").read_text().splitlines():
            inside, _, count = (int(x) for x in line.split())
            if inside <= uid < inside + count:
                return uid
    except (OSError, ValueError):
        pass
    return 65534


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _count_user_processes(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    n += 1
    return n


def _worker_loop(st: _WorkerState) -> None:
    while True:
        try:
            req = _recv(st.proto_in)
        except (EOFError, OSError):
            if not st.in_pidns:  # (a namespace's tmpfs goes away with it)
                shutil.rmtree(os.path.dirname(st.workdir), ignore_errors=True)
            os._exit(0)  # the pool went away; as PID 1 our exit also ends any program
        result = _run_one(st, req["code"])
        _send(st.proto_out, result)


def _run_one(st: _WorkerState, code: str) -> dict:
    spec = st.spec
    style = spec["output_style"]
    cap = spec["max_output_bytes"]
    timeout = spec["timeout_s"]
    st.shm[:4] = b"\0\0\0\0"
    with contextlib.suppress(OSError):  # the last program may have chmod-ed it
        os.chmod(st.workdir, 0o700)
    r, w = os.pipe()
    t0 = time.monotonic()
    try:
        pid = os.fork()
    except OSError as e:  # e.g. a normal user at their process limit
        os.close(r)
        os.close(w)
        return {
            "ok": False,
            "stdout": "",
            "error_type": "SandboxError",
            "error_message": f"could not fork the program's process: {e}",
            "timed_out": False,
            "duration_s": 0.0,
            "output_style": style,
        }
    if pid == 0:  # the program's process; never returns
        os.close(r)
        _child_main(st, code, w)
    os.close(w)
    os.set_blocking(r, False)
    out = bytearray()
    timed_out = output_exceeded = False
    deadline = t0 + timeout
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # old kernel: poll the child every 10 ms instead
    status: int | None = None
    pipe_open, exited = True, False
    poller = select.poll()
    poller.register(r, select.POLLIN)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    while not exited and not output_exceeded:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        wait_ms = math.ceil(remaining * 1000)
        for fd, _ in poller.poll(wait_ms if pidfd is not None else min(10, wait_ms)):
            if fd == r:
                if not _drain(r, out, cap):
                    poller.unregister(r)
                    pipe_open = False
                output_exceeded = len(out) > cap
            elif fd == pidfd:
                exited = True
        if pidfd is None and not exited:
            reaped, st_ = os.waitpid(pid, os.WNOHANG)
            if reaped == pid:
                exited, status = True, st_
    if not exited or output_exceeded:
        _kill_program(st, pid)
    if status is None:
        status = _reap(pid)
    duration = time.monotonic() - t0
    _cleanup_leftovers(st)
    if pipe_open and len(out) <= cap:  # what the program (or its leftovers) wrote last
        _drain(r, out, cap)
        output_exceeded = output_exceeded or len(out) > cap
    os.close(r)
    if pidfd is not None:
        os.close(pidfd)
    _clean_scratch(st)

    verdict = _read_verdict(st.shm)
    stdout = bytes(out[:cap]).decode("utf-8", errors="replace")
    if style == "authors" and verdict is not None and verdict.get("stdout") is not None:
        stdout = verdict["stdout"]
    res = {"ok": False, "stdout": stdout, "error_type": None, "error_message": None, "timed_out": False}
    if output_exceeded:
        res["stdout"] = stdout + _TRUNCATION_MARKER.format(cap)
        res.update(
            error_type="OutputLimitExceeded", error_message=f"the program printed more than {cap} bytes"
        )
    elif timed_out or _is_cpu_timeout(status):
        res["timed_out"] = True
        msg = (
            _AUTHORS_TIMEOUT_MESSAGE.format(timeout)
            if style == "authors"
            else f"the program ran longer than the time limit of {timeout:g} s"
        )
        res.update(error_type="TimeoutError", error_message=msg)
    elif verdict is not None:
        res.update(ok=verdict["ok"], error_type=verdict["error_type"], error_message=verdict["error_message"])
        if verdict["error_type"] == "MemoryError" and not verdict["error_message"]:
            res["error_message"] = f"the program exceeded its memory limit of {spec['memory_mb']} MB"
    elif status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        res.update(error_type="Crash", error_message=f"the program was killed by signal {_signame(sig)}")
    elif status is not None and os.WIFEXITED(status):
        res.update(
            error_type="SystemExit",
            error_message=f"the program exited with code {os.WEXITSTATUS(status)} before finishing (os._exit?)",
        )
    else:
        res.update(error_type="SandboxError", error_message="the program ended without a result")
    res["duration_s"] = duration
    res["output_style"] = style
    return res


def _drain(fd: int, out: bytearray, cap: int) -> bool:
    """Read what is available (up to just past the cap); False once the pipe is closed."""
    while len(out) <= cap:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        out += chunk
    return True


def _kill_program(st: _WorkerState, pid: int) -> None:
    if st.in_pidns:
        os.kill(-1, signal.SIGKILL)  # as PID 1: every other process of this namespace
    else:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # the child made itself a process group leader
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _reap(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def _cleanup_leftovers(st: _WorkerState) -> None:
    """Kill and reap whatever the program left running (background processes, fork bombs).

    Every surviving descendant is, or descends from, a child of ours (orphans are re-parented
    to PID 1 of the namespace, or to us as child subreaper), so "no children" means "nothing
    left"; a single non-blocking wait tells that in the common case."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            continue  # reaped a zombie; look again
        if st.in_pidns:
            os.kill(-1, signal.SIGKILL)
        else:
            for child in _children_of(os.getpid()):
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
        time.sleep(0.001)


def _children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == ppid:
            out.append(int(entry.name))
    return out


def _clean_scratch(st: _WorkerState) -> None:
    """Empty the working directory (and, in the namespace, the private /tmp) for the next program."""
    for d in [st.workdir, *st.scratch]:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.path in ("/tmp/.rstar", "/tmp/.shm", "/tmp/.vartmp"):
                continue
            if any(p == e.path or p.startswith(e.path + "/") for p in _PRESERVED):
                continue  # root-owned and read-only: programs cannot have written there
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, onerror=_force_remove)
                else:
                    os.unlink(e.path)
            except OSError:
                pass


def _force_remove(func, path, _exc) -> None:
    # A program may leave a directory without write permission (non-root mode only).
    with contextlib.suppress(OSError):
        os.chmod(os.path.dirname(path), 0o700)
        func(path)


def _read_verdict(shm: mmap.mmap) -> dict | None:
    (n,) = struct.unpack(">I", shm[:4])
    if n == 0 or n > len(shm) - 4:
        return None
    try:
        v = json.loads(shm[4 : 4 + n])
        return v if isinstance(v, dict) and isinstance(v.get("ok"), bool) else None
    except ValueError:
        return None


def _is_cpu_timeout(status: int | None) -> bool:
    return status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


# -- the program's process ----------------------------------------------------------------------


class _OutputLimit(BaseException):
    """Raised by the authors-style capture buffer past the output limit (a BaseException so a
    program's `except Exception` does not swallow it)."""


def _child_main(st: _WorkerState, code: str, w: int) -> None:
    spec = st.spec
    verdict: dict = {
        "ok": False,
        "error_type": "SandboxError",
        "error_message": "setup failed",
        "stdout": None,
    }
    try:
        os.setsid()
        authors = spec["output_style"] == "authors"
        os.dup2(st.devnull if authors else w, 1)  # authors style: the observation travels in shm
        os.dup2(st.devnull, 0)
        os.dup2(st.devnull, 2)
        os.closerange(3, 1 << 16)
        os.chdir(st.workdir)
        for lim, value in st.limits:
            resource.setrlimit(lim, (value, value + 1))  # CPU: SIGXCPU at the soft limit
        if st.drop_uid is not None:
            os.setgroups([])
            os.setgid(st.drop_uid)
            os.setuid(st.drop_uid)
        if hasattr(sys, "set_int_max_str_digits"):
            sys.set_int_max_str_digits(0)  # big integers print exactly
        sys.stdin, sys.stdout, sys.stderr = sys.__stdin__, sys.__stdout__, sys.__stderr__ = st.stdio
        stdout = st.stdio[1]
        sys.argv = [""]
        if "numpy" in sys.modules:  # os.fork() reseeds `random` but not numpy's global generator
            sys.modules["numpy"].random.seed()
        if authors:
            verdict = _run_authors(code, spec["authors_max_chars"], spec["max_output_bytes"])
        else:
            verdict = _run_faithful(code)
        with contextlib.suppress(BaseException):
            stdout.flush()
    except BaseException as e:  # setup failed: say so rather than look like the program's fault
        verdict = {"ok": False, "error_type": "SandboxError", "error_message": f"{type(e).__name__}: {e}"}
    data = json.dumps(verdict).encode()
    if len(data) + 4 <= len(st.shm):
        st.shm[4 : 4 + len(data)] = data
        st.shm[:4] = struct.pack(">I", len(data))  # written last: a half-written verdict is none
    os._exit(0)


def _exc_message(e: BaseException) -> str:
    try:
        msg = str(e)
    except BaseException:
        msg = "<unprintable exception>"
    return msg if len(msg) <= _MAX_MESSAGE_CHARS else msg[:_MAX_MESSAGE_CHARS] + "..."


def _run_faithful(code: str) -> dict:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(code, "<string>", "exec"), namespace)
    except SystemExit as e:
        arg = "" if e.code is None else repr(e.code)
        return {
            "ok": False,
            "error_type": "SystemExit",
            "error_message": f"the program called sys.exit({arg})",
        }
    except BaseException as e:
        return {"ok": False, "error_type": type(e).__name__, "error_message": _exc_message(e)}
    return {"ok": True, "error_type": None, "error_message": None}


# -- the authors' executor, re-implemented (rStar-math python_tool.py / MARIO PythonInterpreter) --
# Their steps: strip ``` and a leading "python"; parse with ast (so syntax errors read
# "(<unknown>, line N)"); find top-level print statements (also inside the bodies of if/while/for/
# def); with at most one, run everything but the last statement unobserved and report what the
# last one printed (or its value, if it is an expression); with several, run the program in
# segments that end at each print and join "<print args>: <output>" for each; round an output
# that is one float to 4 decimals when that is shorter; cut it to 1024 characters; strip. Errors
# are "Type: message". Unlike theirs, each program starts from a fresh namespace.

_AUTHORS_PRINT_ARGS = re.compile(r"print\((.*?)\)")


class _CappedStringIO(io.StringIO):
    def __init__(self, cap: int):
        super().__init__()
        self._cap, self._n = cap, 0

    def write(self, s: str) -> int:
        self._n += len(s)
        if self._n > self._cap:
            raise _OutputLimit()
        return super().write(s)


class _NullWriter(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def _authors_sanitize(query: str) -> str:
    query = re.sub(r"^(\s|`)*(?i:python)?\s*", "", query)
    return re.sub(r"(\s|`)*$", "", query)


def _authors_clip(value, max_chars: int):
    """Their `truncate_string`: a str that reads as one float is rounded to 4 decimals if that is
    shorter; anything longer than max_chars keeps its first and last halves around "..."."""
    if isinstance(value, str):
        try:
            rounded = str(round(float(value), 4)) + "\n"
            value = value if len(value) < len(rounded) else rounded
        except Exception:
            pass
    if len(str(value)) > max_chars:
        text = str(value)
        return text[: max_chars // 2] + "..." + text[(-max_chars) // 2 :]
    return value


def _authors_is_print(node: ast.AST) -> bool:
    if (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    ):
        return True
    if isinstance(node, (ast.If, ast.While, ast.For, ast.FunctionDef)):
        return any(_authors_is_print(n) for n in node.body)
    return False


def _authors_segment(body: list[ast.stmt], namespace: dict, max_chars: int, cap: int):
    buf = _CappedStringIO(cap)
    exec(ast.unparse(ast.Module(body[:-1], type_ignores=[])), namespace)  # output not observed
    last = ast.unparse(ast.Module(body[-1:], type_ignores=[]))
    try:
        with contextlib.redirect_stdout(buf):
            value = eval(last, namespace)
            return _authors_clip(buf.getvalue() if value is None else value, max_chars)
    except Exception:  # not an expression (or it raised): run it as a statement, same buffer
        with contextlib.redirect_stdout(buf):
            exec(last, namespace)
        return _authors_clip(buf.getvalue(), max_chars)


def _authors_observation(code: str, namespace: dict, max_chars: int, cap: int) -> str:
    code = _authors_sanitize(code)
    tree = ast.parse(code)
    prints = [i for i, node in enumerate(tree.body) if _authors_is_print(node)] or [len(tree.body) - 1]
    if len(prints) == 1:
        return f"{_authors_segment(tree.body, namespace, max_chars, cap)}"
    parts = []
    for start, end in zip([-1] + prints, prints):
        source = ast.get_source_segment(code, tree.body[end])
        args = _AUTHORS_PRINT_ARGS.findall(source)
        label = " ".join(args) + ":" if args else ""
        value = _authors_segment(tree.body[start + 1 : end + 1], namespace, max_chars, cap)
        parts.append(f"{label} {value}")
    return "".join(parts)


def _run_authors(code: str, max_chars: int, cap: int) -> dict:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sys.stdout = _NullWriter()  # what their executor did not capture is lost, as it was there
    try:
        obs = _authors_observation(code, namespace, max_chars, cap).strip()
    except _OutputLimit:
        return {
            "ok": False,
            "error_type": "OutputLimitExceeded",
            "error_message": f"more than {cap} characters",
        }
    except BaseException as e:
        return {"ok": False, "error_type": type(e).__name__, "error_message": _exc_message(e), "stdout": ""}
    if len(obs) > cap:
        return {
            "ok": False,
            "error_type": "OutputLimitExceeded",
            "error_message": f"more than {cap} characters",
        }
    return {"ok": True, "error_type": None, "error_message": None, "stdout": obs}


# ---------------------------------------------------------------------------------------------
# `rstar exec FILE.py`
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="Python file to run")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock (and CPU) limit in seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="address space the program may add")
    parser.add_argument(
        "--output-style",
        choices=OUTPUT_STYLES,
        default="faithful",
        help="faithful: what Python prints; authors: the observation the authors' executor produced",
    )
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    code = Path(args.file).read_text()
    cfg = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb, output_style=args.output_style)
    result = run_code(code, cfg)
    sys.stdout.write(result.stdout)
    if result.stdout and not result.stdout.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not result.ok:
        print(result.observation(), file=sys.stderr)
        return 1
    return 0
