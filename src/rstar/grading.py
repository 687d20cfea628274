"""Answer equivalence: math-verify, run in killable worker processes.

The search grades every terminal node against the gold answer, so this is called many times a
second and must never hang. math-verify (Hugging Face) decides equivalence; its own timeouts use
`signal.alarm`, which only works in a main thread and cannot interrupt long C-level work, and
it is known to hang (huggingface/Math-Verify#65: a nested power whose parsed value cannot even
be printed; sympy work outside its timeout wrappers is unguarded). So checks run in
worker processes (their main thread, where math-verify's alarms do work), and the parent
enforces a hard per-item deadline on top: a worker that overruns is killed and replaced, and the
item grades false with reason "timeout".

Protocol (one JSON value a line): the parent sends an idle worker one line holding a batch of
(gold, pred) items; the worker answers one line per item as it finishes, so the parent can time
each item separately while paying one round trip per batch. The parent does not import
math-verify (nor sympy) at all, so `rstar grade` and the search process stay light.

What is compared (in the worker):
- gold: a benchmark answer in LaTeX (`\\frac{14}{3}`, `\\text{Evelyn}`, `10\\%`), parsed as
  `\\boxed{gold}`, which makes math-verify read it as one LaTeX answer.
- pred: if it contains `\\boxed`, the content of its *last* `\\boxed{...}` (the rStar-Math
  convention for the final answer; math-verify itself would merge several boxes into a set);
  otherwise a bare answer ("16", "\\frac{1}{2}", "x = 5") is read as `\\boxed{pred}`, and
  prose ("The answer is 5", text with `$...$`) is left to math-verify's own extraction.

Why one file of this length: the normalisation rules, the worker protocol and the pool are
the grader's one idea (a verdict that cannot hang the caller); rstar.workers holds what it
shares with the sandbox.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import queue
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from rstar.steps import extract_boxed
from rstar.workers import STARTUP_TIMEOUT_S, kill_process, worker_command

# Reasons a GradeResult can carry. Only the "settled" ones are cached by the parent: a timeout
# or a dead worker may go differently next time (the machine was loaded, a worker was killed).
REASON_OK = "ok"  # math-verify ran to the end; `equivalent` is its verdict
REASON_STRING = "string_fallback"  # gold has no math-verify parse: normalized string equality
REASON_PARSE = "parse_error"  # nothing gradable in pred (or an empty gold): not equivalent
REASON_TIMEOUT = "timeout"  # hard deadline (worker killed) or a math-verify internal timeout
REASON_DIED = "worker_died"  # the worker exited while on this item (e.g. killed from outside)
REASON_ERROR = "error"  # an exception inside the worker
_SETTLED = frozenset({REASON_OK, REASON_STRING, REASON_PARSE})

_CACHE_SIZE = 65536  # parent-side (gold, pred) -> result cache; MCTS repeats answers a lot
_MAX_BATCH = 32  # items per worker round trip (bounds the work redone after a kill)


@dataclass
class GradeResult:
    equivalent: bool
    reason: str  # "ok" | "timeout" | "parse_error" | "string_fallback" | "worker_died" | "error"


class GraderError(RuntimeError):
    """The grader cannot work at all (a worker fails to start, or the grader is closed)."""


# ----------------------------------------------------------------------------------------------
# Parent side: the pool.


@dataclass
class GraderWorker:
    """The grader's handle on one worker process (its state in the event loop of `Grader._run`).
    Starting and killing a worker is shared with the sandbox (`rstar.workers`); the line protocol
    and its per-item deadlines are the grader's own."""

    proc: subprocess.Popen
    stderr: IO[bytes]  # a temp file: read back only to explain a worker that fails to start
    started: float
    ready: bool = False
    buf: bytes = b""  # partial line read from the worker
    outbuf: bytes = b""  # batch message not yet written to the worker
    batch: list[int] = field(default_factory=list)  # global indices sent, not yet answered
    next_k: int = 0  # position in the batch of the item the worker is on
    item_start: float = 0.0

    @property
    def fd(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    @property
    def in_fd(self) -> int:
        assert self.proc.stdin is not None
        return self.proc.stdin.fileno()


_SPAWNER: ThreadPoolExecutor | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawn_worker(memory_mb: int | None) -> GraderWorker:
    # Workers ask the kernel to kill them when their parent goes (PR_SET_PDEATHSIG), and Linux
    # ties that to the *thread* that forked them. So all workers are started from one
    # long-lived thread: a grader created in a short-lived thread keeps its workers.
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rstar-grading-spawn")
    return _SPAWNER.submit(_start_worker, memory_mb).result()


def _start_worker(memory_mb: int | None) -> GraderWorker:
    # A fresh interpreter that imports this module (`rstar.workers`), not a fork: the search
    # process may hold torch and gigabytes of address space.
    env = dict(os.environ)
    env["RSTAR_GRADER_PARENT"] = str(os.getpid())
    env["RSTAR_GRADER_MEMORY_MB"] = str(memory_mb or 0)
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        worker_command("rstar.grading"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        close_fds=True,
    )
    assert proc.stdin is not None
    os.set_blocking(proc.stdin.fileno(), False)  # see _run: writes must never block the parent
    return GraderWorker(proc=proc, stderr=stderr, started=time.monotonic())


def _kill_worker(w: GraderWorker) -> None:
    kill_process(w.proc, w.stderr)


def _stderr_tail(w: GraderWorker, n: int = 2000) -> str:
    try:
        w.stderr.seek(0)
        return w.stderr.read().decode("utf-8", "replace")[-n:]
    except (OSError, ValueError):
        return ""


_LIVE_GRADERS: weakref.WeakSet[Grader] = weakref.WeakSet()


class Grader:
    """A pool of killable math-verify worker processes. Thread-safe; a context manager.

    `timeout_s` is the hard limit for one item (parsing both sides and comparing), enforced by
    the parent whatever the worker is doing. Concurrent callers each check out idle workers, so
    `workers` also bounds how many checks run at once.
    """

    def __init__(self, workers: int = 1, timeout_s: float = 5.0, *, memory_mb: int | None = 4096):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.memory_mb = memory_mb
        # math-verify's own (signal, whole-second) timeouts, per parse and per comparison. Under
        # the hard deadline so that slow-but-interruptible items usually end inside the worker
        # (cheap) and only real hangs cost a kill and a ~1-2 s respawn; not much under it, as a
        # loaded machine makes ordinary checks slow (a cold worker's first matrix comparison).
        self._inner_timeout = max(1, int(self.timeout_s * 0.6))
        self._idle: queue.Queue[GraderWorker] = queue.Queue()
        self._closed = False
        self._cache: OrderedDict[tuple[str, str], GradeResult] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.stats = {"items": 0, "cache_hits": 0, "timeouts": 0, "kills": 0, "respawns": 0}
        self._stats_lock = threading.Lock()
        # Start all workers now so they import in parallel; readiness is awaited on first use.
        for _ in range(workers):
            self._idle.put(_spawn_worker(memory_mb))
        _LIVE_GRADERS.add(self)

    # -- public API ----------------------------------------------------------------------------

    def grade(self, gold: str, pred: str) -> bool:
        return self.grade_many([(gold, pred)])[0].equivalent

    def grade_many(self, pairs: list[tuple[str, str]]) -> list[GradeResult]:
        """Grade (gold, pred) pairs; results are in the order of `pairs`."""
        if self._closed:
            raise GraderError("grader is closed")
        results: list[GradeResult | None] = [None] * len(pairs)
        todo: list[int] = []
        with self._cache_lock:
            for i, (gold, pred) in enumerate(pairs):
                if not isinstance(gold, str) or not isinstance(pred, str):
                    raise TypeError(f"pair {i}: gold and pred must be str, got {type(gold)}, {type(pred)}")
                hit = self._cache.get((gold, pred))
                if hit is not None:
                    self._cache.move_to_end((gold, pred))
                    results[i] = GradeResult(hit.equivalent, hit.reason)
                else:
                    todo.append(i)
        with self._stats_lock:
            self.stats["items"] += len(pairs)
            self.stats["cache_hits"] += len(pairs) - len(todo)
        if todo:
            workers = self._checkout(len(todo))
            try:
                got = self._run(workers, [pairs[i] for i in todo])
            finally:
                self._checkin(workers)
            with self._cache_lock:
                for i, r in zip(todo, got):
                    results[i] = r
                    if r.reason in _SETTLED:
                        self._cache[pairs[i]] = GradeResult(r.equivalent, r.reason)
                        if len(self._cache) > _CACHE_SIZE:
                            self._cache.popitem(last=False)
        return [r for r in results if r is not None]

    def worker_pids(self) -> list[int]:
        """Pids of the idle workers (for diagnostics and tests)."""
        return [w.proc.pid for w in list(self._idle.queue)]

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                _kill_worker(self._idle.get_nowait())
            except queue.Empty:
                break

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- pool ----------------------------------------------------------------------------------

    def _checkout(self, n_items: int) -> list[GraderWorker]:
        # Block for one worker, then take whatever else is idle, up to what the items can use.
        while True:
            if self._closed:
                raise GraderError("grader is closed")
            try:
                first = self._idle.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        got = [first]
        while len(got) < min(self.workers, n_items):
            try:
                got.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for w in list(got):  # an idle worker that died (killed from outside): replace it quietly
            if w.proc.poll() is not None and w.ready:
                self._replace(got, w)
        return got

    def _checkin(self, workers: list[GraderWorker]) -> None:
        for w in workers:
            if self._closed:
                _kill_worker(w)
            else:
                self._idle.put(w)

    def _replace(self, workers: list[GraderWorker], w: GraderWorker) -> GraderWorker:
        _kill_worker(w)
        new = _spawn_worker(self.memory_mb)
        workers[workers.index(w)] = new
        with self._stats_lock:
            self.stats["respawns"] += 1
        return new

    # -- the event loop of one grade_many call -------------------------------------------------

    def _run(self, workers: list[GraderWorker], pairs: list[tuple[str, str]]) -> list[GradeResult]:
        n = len(pairs)
        results: list[GradeResult | None] = [None] * n
        pending: deque[int] = deque(range(n))
        retried = [False] * n
        # Small batches when several workers share the items (load balance), bigger when alone.
        batch_size = max(1, min(_MAX_BATCH, math.ceil(n / (2 * len(workers)))))
        # Only the final answer travels when there is a \boxed (long model outputs stay here).
        wire = [(g, _wire_pred(p)) for g, p in pairs]

        def assign(w: GraderWorker) -> None:
            if w.batch or not pending:
                return
            take = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            msg = {"t": self._inner_timeout, "items": [wire[i] for i in take]}
            w.batch, w.next_k, w.item_start = take, 0, time.monotonic()
            # Written by the loop below as the pipe accepts it (non-blocking): a stuck worker
            # that stops reading must not block the parent past its deadline.
            w.outbuf = (json.dumps(msg) + "\n").encode()

        def finish(w: GraderWorker, res: GradeResult) -> None:
            results[w.batch[w.next_k]] = res
            w.next_k += 1
            w.item_start = time.monotonic()
            if w.next_k == len(w.batch):
                w.batch, w.next_k = [], 0

        def fail_and_replace(w: GraderWorker, reason: str) -> GraderWorker:
            # The rest of its batch goes back to the queue. The item it was on gets `reason`,
            # except that a death gets one retry: a worker killed from outside (OOM killer, a
            # user) says nothing about the item, while a crash the item causes recurs.
            head = w.batch[w.next_k]
            rest = w.batch[w.next_k + 1 :]
            if reason == REASON_DIED and not retried[head]:
                retried[head] = True
                rest = [head, *rest]
            else:
                results[head] = GradeResult(False, reason)
            pending.extendleft(reversed(rest))
            w.batch, w.next_k, w.outbuf = [], 0, b""
            new = self._replace(workers, w)
            assign(new)
            return new

        def on_readable(w: GraderWorker) -> None:
            try:
                data = os.read(w.fd, 1 << 16)
            except OSError:
                data = b""
            if not data:  # EOF: the worker died
                if not w.ready:
                    tail = _stderr_tail(w)
                    w.batch = []
                    self._replace(workers, w)
                    raise GraderError(f"grading worker failed to start:\n{tail}")
                fail_and_replace(w, REASON_DIED)
                return
            w.buf += data
            *lines, w.buf = w.buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if msg == "ready":
                    w.ready = True
                    w.item_start = time.monotonic()  # startup time is not the item's
                    continue
                k, eq, reason = msg
                if k != w.next_k or not w.batch:  # cannot happen with a sane worker; do not guess
                    raise GraderError(f"grading worker answered item {k}, expected {w.next_k}")
                if reason == REASON_TIMEOUT:
                    with self._stats_lock:
                        self.stats["timeouts"] += 1
                finish(w, GradeResult(bool(eq), str(reason)))
            assign(w)

        def on_writable(w: GraderWorker) -> None:
            try:
                sent = os.write(w.in_fd, w.outbuf)
            except BlockingIOError:
                return
            except OSError:  # broken pipe: the worker died; its EOF on stdout says so
                w.outbuf = b""
                return
            w.outbuf = w.outbuf[sent:]

        for w in workers:
            assign(w)
        sel = selectors.DefaultSelector()
        try:
            while any(w.batch for w in workers):
                busy = [w for w in workers if w.batch]
                for w in busy:
                    sel.register(w.fd, selectors.EVENT_READ, (w, on_readable))
                    if w.outbuf:
                        sel.register(w.in_fd, selectors.EVENT_WRITE, (w, on_writable))
                wait = max(0.0, min(self._deadline(w) for w in busy) - time.monotonic())
                events = sel.select(timeout=wait)
                for key in list(sel.get_map().values()):
                    sel.unregister(key.fileobj)
                for key, _ in events:
                    w, handler = key.data
                    if w in workers and w.batch:  # not replaced by an earlier event of this round
                        handler(w)
                now = time.monotonic()
                for w in list(workers):
                    if w.batch and now >= self._deadline(w):
                        if not w.ready:
                            tail = _stderr_tail(w)
                            w.batch = []
                            self._replace(workers, w)
                            raise GraderError(
                                f"grading worker not ready after {STARTUP_TIMEOUT_S:.0f} s:\n{tail}"
                            )
                        with self._stats_lock:
                            self.stats["timeouts"] += 1
                            self.stats["kills"] += 1
                        fail_and_replace(w, REASON_TIMEOUT)
        finally:
            sel.close()
            # An exception mid-loop leaves workers with unanswered items: they are out of step
            # with the protocol, so replace them rather than hand them back.
            for w in list(workers):
                if w.batch:
                    w.batch = []
                    self._replace(workers, w)
        return [r if r is not None else GradeResult(False, REASON_ERROR) for r in results]

    def _deadline(self, w: GraderWorker) -> float:
        if not w.ready:
            return w.started + STARTUP_TIMEOUT_S
        return w.item_start + self.timeout_s


@atexit.register
def _close_all() -> None:
    for g in list(_LIVE_GRADERS):
        g.close()


_DEFAULT_GRADERS: dict[float, Grader] = {}
_DEFAULT_LOCK = threading.Lock()


def is_equivalent(gold: str, pred: str, timeout_s: float = 5.0) -> bool:
    """One check through a lazily created module-level Grader (one per timeout value)."""
    with _DEFAULT_LOCK:
        grader = _DEFAULT_GRADERS.get(timeout_s)
        if grader is None or grader._closed:
            grader = _DEFAULT_GRADERS[timeout_s] = Grader(workers=1, timeout_s=timeout_s)
    return grader.grade(gold, pred)


# ----------------------------------------------------------------------------------------------
# String helpers (used by the worker; pure functions, importable without math-verify).


def _wire_pred(pred: str) -> str:
    """What the worker needs of pred: `\\boxed{last box}` if it has one, else all of it."""
    boxed = extract_boxed(pred, partial=True) if "box" in pred else None
    return pred if boxed is None else "\\boxed{" + boxed + "}"


# LaTeX that is not prose: commands, text/env groups (their words are part of the answer).
_NOT_PROSE = re.compile(r"\\(?:text\w*|mbox|mathrm|begin|end|operatorname)\s*\{[^{}]*\}|\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")


def _is_prose(pred: str) -> bool:
    """True for text to leave to math-verify's extraction ("The answer is 5", "$x$ is 3")."""
    if "$" in pred or "\\(" in pred or "\\[" in pred:
        return True
    return bool(_WORD.search(_NOT_PROSE.sub(" ", pred)))


_TEXT_GROUP = re.compile(r"\\(?:text\w*|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")


def normalize_answer_string(s: str) -> str:
    """Loose string form for the string fallback: no $, text wrappers, spacing or case."""
    s = s.strip().strip("$")
    s = _TEXT_GROUP.sub(r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\[,;:! ]|~", "", s)
    s = re.sub(r"\s+", "", s).lower()
    return s.rstrip(".")


# ----------------------------------------------------------------------------------------------
# Worker side.


def _worker_main() -> None:
    """Entry point of a worker process (started by `_spawn_worker`)."""
    _die_with_parent(int(os.environ.get("RSTAR_GRADER_PARENT", "0")))
    memory_mb = int(os.environ.get("RSTAR_GRADER_MEMORY_MB", "0"))
    if memory_mb > 0:  # a runaway expansion should fail with MemoryError, not swap the machine
        import resource

        lim = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    # Protocol on a private copy of stdout; anything a library prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    check = _WorkerChecker()
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        t = int(msg["t"])
        for k, (gold, pred) in enumerate(msg["items"]):
            eq, reason = check(gold, pred, t)
            out.write(json.dumps([k, eq, reason]) + "\n")
            out.flush()


def _die_with_parent(parent_pid: int) -> None:
    # A worker stuck in a hang never reads EOF on stdin; have the kernel kill it with the parent
    # (strictly: with the parent's thread that started it, hence `_spawn_worker`'s thread).
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_pid and os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


class _WorkerChecker:
    """One check, inside a worker: math-verify, with its parses cached."""

    def __init__(self) -> None:
        import logging

        import math_verify
        from math_verify.errors import TimeoutException

        self._mv_parse = math_verify.parse
        self._verify = math_verify.verify
        self._timeout_exc = TimeoutException
        # Parses are most of a check's cost (~2-5 ms; verify of parsed values is ~0.05 ms), and
        # gold and pred go through the same `parse("\\boxed{...}")`, so one LRU serves both:
        # the search repeats answers, and a gold equal to a pred is parsed once.
        self._parse_cache: OrderedDict[str, list] = OrderedDict()
        self.timed_out = False

        # math-verify swallows its own timeouts (logging a warning, returning []/False); catch
        # the warning to report reason "timeout" instead of a plain "not equivalent".
        checker = self

        class _TimeoutFlag(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "Timeout" in record.getMessage():
                    checker.timed_out = True

        log = logging.getLogger("math_verify")
        log.setLevel(logging.WARNING)
        log.addHandler(_TimeoutFlag())
        log.propagate = False
        # Warm up: the first LaTeX parse loads the grammar (~100 ms); do it before "ready".
        self._verify(self._mv_parse("\\boxed{\\frac{1}{2}}"), self._mv_parse("0.5"))

    def __call__(self, gold: str, pred: str, t: int) -> tuple[bool, str]:
        self.timed_out = False
        try:
            eq, reason = self._check(gold, pred, t)
        except self._timeout_exc:
            return False, REASON_TIMEOUT
        except Exception:
            return False, REASON_ERROR
        if self.timed_out and not eq:
            return False, REASON_TIMEOUT
        return eq, reason

    def _parse(self, text: str, parsing_timeout: int) -> list:
        hit = self._parse_cache.get(text)
        if hit is not None:
            self._parse_cache.move_to_end(text)
            return hit
        before = self.timed_out
        self.timed_out = False
        parsed = self._mv_parse(text, parsing_timeout=parsing_timeout)
        if not self.timed_out:  # do not cache a parse that a timeout cut short
            self._parse_cache[text] = parsed
            if len(self._parse_cache) > 8192:
                self._parse_cache.popitem(last=False)
        self.timed_out = self.timed_out or before
        return parsed

    def _gold(self, gold: str, t: int) -> list | None:
        parsed = self._parse("\\boxed{" + gold + "}", parsing_timeout=t)
        # "Parsed" means math-verify produced at least one sympy object; a bare string match
        # only would make verify() fall back to exact string equality anyway.
        return parsed if any(not isinstance(x, str) for x in parsed) else None

    def _check(self, gold: str, pred: str, t: int) -> tuple[bool, str]:
        gold, pred = gold.strip(), pred.strip()
        boxed = extract_boxed(pred, partial=True)
        answer = boxed if boxed is not None else pred
        if not gold or not answer:
            return False, REASON_PARSE
        g = self._gold(gold, t)
        if g is None:
            # Gold that math-verify cannot parse at all (none of the 1,889 golds of the four
            # benchmark files is such; see tests/test_grading.py): compare normalized strings.
            return normalize_answer_string(gold) == normalize_answer_string(answer), REASON_STRING
        as_boxed = "\\boxed{" + answer + "}"
        if boxed is not None:
            p = self._parse(as_boxed, parsing_timeout=t)
        elif _is_prose(pred):  # math-verify's extraction first; a lone word ("Evelyn") is an answer
            p = self._parse(pred, parsing_timeout=t) or self._parse(as_boxed, parsing_timeout=t)
        else:
            p = self._parse(as_boxed, parsing_timeout=t) or self._parse(pred, parsing_timeout=t)
        if not p:
            return False, REASON_PARSE
        return bool(self._verify(g, p, timeout_seconds=t)), REASON_OK


# ----------------------------------------------------------------------------------------------
# CLI: `rstar grade GOLD PRED` and `rstar grade --pairs FILE.jsonl`.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gold", nargs="?", help="gold answer (LaTeX, e.g. '\\frac{1}{2}')")
    parser.add_argument("pred", nargs="?", help="predicted answer or text with \\boxed{...}")
    parser.add_argument(
        "--pairs",
        metavar="FILE.jsonl",
        help='grade each line {"gold": ..., "pred": ...} of FILE ("-" for stdin); prints one JSON line per pair',
    )
    from rstar.checks import positive_int, seconds

    parser.add_argument(
        "--timeout", type=seconds, default=5.0, help="hard limit per pair, seconds (default 5)"
    )
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    parser.set_defaults(func=_cli)


def _read_pairs(path: str) -> list[tuple[dict, str, str]]:
    name = "<stdin>" if path == "-" else path
    try:
        f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{name}: cannot open: {e.strerror}") from e
    rows = []
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{name}:{lineno}: expected a JSON object with 'gold' and 'pred'")
            for key in ("gold", "pred"):
                if key not in obj:
                    raise ValueError(f"{name}:{lineno}: missing field {key!r}")
                if isinstance(obj[key], bool) or not isinstance(obj[key], str | int | float):
                    raise ValueError(f"{name}:{lineno}: field {key!r} must be a string")
            rows.append((obj, str(obj["gold"]), str(obj["pred"])))
    return rows


def _cli(args: argparse.Namespace) -> int:
    if args.pairs is not None:
        if args.gold is not None:
            print("rstar grade: give either GOLD PRED or --pairs FILE, not both", file=sys.stderr)
            return 2
        try:
            rows = _read_pairs(args.pairs)
        except ValueError as e:
            print(f"rstar grade: error: {e}", file=sys.stderr)
            return 2
        with Grader(workers=args.workers, timeout_s=args.timeout) as grader:
            results = grader.grade_many([(g, p) for _, g, p in rows])
        for (obj, _, _), r in zip(rows, results):
            print(json.dumps({**obj, "equivalent": r.equivalent, "reason": r.reason}, ensure_ascii=False))
        return 0
    if args.gold is None or args.pred is None:
        print("rstar grade: give GOLD PRED, or --pairs FILE.jsonl", file=sys.stderr)
        return 2
    with Grader(workers=1, timeout_s=args.timeout) as grader:
        r = grader.grade_many([(args.gold, args.pred)])[0]
    print("true" if r.equivalent else "false")
    if r.reason not in (REASON_OK, REASON_STRING):
        print(f"({r.reason})", file=sys.stderr)
    return 0 if r.equivalent else 1
