"""One writer per output directory: an exclusive `flock` on `DIR/.rstar.lock`.

Every command that writes records into a directory (`rstar generate`, `rstar eval`, `rstar
evolve`, the Ray driver) holds this lock for as long as it writes. A second writer fails at once
with one line naming the holder's pid. The kernel drops an flock when its process dies (kill -9
included), so a lock is never stale; the pid written into the file is only for the message.

Within one process the lock is re-entrant (evolve's rounds and eval's settings take the locks of
their subdirectories, and a caller may hold a directory's lock around `generate`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rstar import RstarError

LOCK_NAME = ".rstar.lock"

_held: dict[str, tuple[int, int]] = {}  # real path of the directory -> (fd, depth)
_guard = threading.Lock()


class DirectoryLocked(RstarError):
    pass


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        return f"pid {pid}"
    return "another process"


@contextlib.contextmanager
def locked_dir(directory: str | Path, what: str = "--out") -> Iterator[Path]:
    """Create `directory` if needed and hold its write lock for the block.

    Raises DirectoryLocked at once if another process holds it. If this call created the
    directory and the block fails before anything of value was written (every file in it empty,
    or only `run.json`), the directory is removed again: a failed start leaves nothing behind."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RstarError(f"{what} {directory}: exists and is not a directory")
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RstarError(f"{what} {directory}: cannot create the directory ({e.strerror})") from e
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RstarError(f"{what} {directory}: the directory is not writable")
    key = os.path.realpath(directory)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            fd = -1  # re-entered: the outermost holder releases
        else:
            fd = _acquire(directory, what)
            _held[key] = (fd, 1)
    ok = False
    try:
        yield directory
        ok = True
    finally:
        with _guard:
            held_fd, depth = _held[key]
            if depth > 1:
                _held[key] = (held_fd, depth - 1)
            else:
                del _held[key]
                if not ok and created:
                    _remove_if_worthless(directory)
                os.close(held_fd)  # closing the descriptor drops the flock


def _alive(holder: str) -> bool:
    if not holder.startswith("pid "):
        return True
    try:
        os.kill(int(holder[4:]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        pass
    return True


def _acquire(directory: Path, what: str, orphan_wait_s: float = 10.0) -> int:
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + orphan_wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(path)
            # The writer has died but a process it forked still holds the descriptor: that one
            # goes soon (its parent is gone), so wait a little rather than fail.
            if not _alive(holder) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            os.close(fd)
            left = "" if _alive(holder) else ", which has exited; a process it started still holds the lock"
            raise DirectoryLocked(
                f"{what} {directory} is in use by another rstar process ({holder}{left}): "
                "wait for it to finish or pick another directory"
            ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_if_worthless(directory: Path) -> None:
    for root, _dirs, files in os.walk(directory):
        for name in files:
            p = Path(root) / name
            if name not in (LOCK_NAME, "run.json") and p.stat().st_size > 0:
                return
    shutil.rmtree(directory, ignore_errors=True)


def writes_to(where: str | Callable[..., str | Path], what: str = "--out") -> Callable:
    """Decorator: hold the lock of the directory named by argument `where` (or `where(*args,
    **kwargs)`) while the function runs."""

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if callable(where):
                directory = where(*args, **kwargs)
            else:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                directory = bound.arguments[where]
            with locked_dir(directory, what):
                return fn(*args, **kwargs)

        return wrapper

    return deco
