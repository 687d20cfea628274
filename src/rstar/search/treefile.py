"""Tree files: one JSON line per finished search, appended as each finishes.

Schema: docs/TREE_FILES.md. Invariants:
- a line is written with a single `write` on a file opened O_APPEND, and flushed to disk
  before the search counts as done, so a killed run (kill -9 included) leaves whole lines
  plus at most one partial last line;
- `open_for_resume` cuts that partial line off before appending, so no half-written line is
  ever read back, and returns the keys already done, so no search runs twice.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from rstar import RstarError, __version__


class TreeFileError(RstarError):
    pass


def versions() -> dict:
    """Versions that shape the results, recorded in every line (read from package metadata,
    which does not import torch)."""
    out = {"rstar": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformers", "vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # vllm on CPU machines
            pass
    return out


class TreeFileWriter:
    """Appends records to a tree file; each `write` is durable when it returns."""

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        # One write() call: the kernel appends it at the end as a unit (O_APPEND), so two
        # writers never interleave and a kill leaves at most this line partial.
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TreeFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_records(path: str | Path, strict: bool = True) -> Iterator[dict]:
    """Records of a tree file. A last line without its newline is a write cut short by a
    kill: it is skipped. Any other bad line is an error naming the file and line (or, with
    strict=False, skipped)."""
    path = Path(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    # After a complete file, split gives a final b"" element; anything else there is partial.
    for lineno, raw in enumerate(lines[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            if strict:
                raise TreeFileError(f"{path}:{lineno}: not a JSON record ({e})") from e
            continue
        if not isinstance(rec, dict) or "key" not in rec:
            if strict:
                raise TreeFileError(f"{path}:{lineno}: not a tree record (no 'key' field)")
            continue
        yield rec


def open_for_resume(path: str | Path) -> set[str]:
    """Cut a partial last line (left by a kill) off the file and return the keys done."""
    path = Path(path)
    if not path.exists():
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1  # 0 when there is no complete line at all
        if end < len(data):
            f.truncate(end)
    keys = set()
    for rec in iter_records(path):
        keys.add(rec["key"])
    return keys
