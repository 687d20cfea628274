"""The pool (runs in the search process; imports nothing heavy): `SandboxPool` and its handles
on worker processes (`SandboxWorker`), which it starts, feeds one program at a time, and kills
and replaces when they die or hang."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import itertools
import json
import os
import queue
import re
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass

from rstar.sandbox.settings import SandboxConfig
from rstar.sandbox.styles import format_error
from rstar.sandbox.wire import recv_frame, send_frame
from rstar.workers import STARTUP_TIMEOUT_S, kill_process, worker_command

_BACKSTOP_S = 10.0  # the pool kills a worker that has not answered timeout_s + this after a request
_UID_BASE = 600_000_000  # sandbox uids are taken from here up (to ~1.24e9): no real accounts there


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
        self._workers: list[SandboxWorker] = []
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
                w = SandboxWorker(self.config, kind, uid=uid_base + k_index * 32 + i % 32, eager=start_now)
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
    def _serve(self, worker: SandboxWorker, q: queue.SimpleQueue) -> None:
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
    one = dataclasses.replace(cfg, workers=1)
    with SandboxPool(one, eager=False) as pool:
        return pool.run(code)


def _sandbox_error(message: str, output_style: str, duration_s: float = 0.0) -> ExecResult:
    return ExecResult(False, "", "SandboxError", message, False, duration_s, output_style)


class SandboxWorker:
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
        spec = {
            "kind": self.kind,
            "uid": self.uid,
            "preload": list(self.cfg.preload)
            + (list(self.cfg.heavy_preload) if self.kind == "heavy" else []),
            **{k: v for k, v in self.cfg.__dict__.items() if k not in ("preload", "heavy_preload")},
        }
        if self.cfg.seccomp:
            from rstar.sandbox.syscalls import bpf_for_workers

            spec["seccomp_bpf"] = bpf_for_workers()
        self.proc = subprocess.Popen(
            [*worker_command("rstar.sandbox.worker"), json.dumps(spec)],
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
            msg = recv_frame(self.proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT_S)
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
            send_frame(self.proc.stdin.fileno(), {"code": code})
            msg = recv_frame(self.proc.stdout.fileno(), time.monotonic() + self.cfg.timeout_s + _BACKSTOP_S)
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
            kill_process(self.proc)
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


def _kill_all(workers: list[SandboxWorker]) -> None:
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
