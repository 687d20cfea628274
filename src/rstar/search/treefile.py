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
from collections.abc import Iterable, Iterator
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


def numbered_records(path: str | Path, strict: bool = True) -> Iterator[tuple[str, dict]]:
    """(origin "file:line", record) for each record of a tree file, streamed line by line (big
    files are not held in memory). A last line without its newline is a write cut short by a
    kill: it is skipped. Any other bad line is an error naming the file and line (or, with
    strict=False, skipped); the origin lets later checks (missing fields) name it too."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break  # partial last line
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                if strict:
                    raise TreeFileError(f"{path}:{lineno}: not a JSON record ({e})") from e
                continue
            if not isinstance(rec, dict) or "key" not in rec:
                if strict:
                    raise TreeFileError(f"{path}:{lineno}: not a tree record (no 'key' field)")
                continue
            yield f"{path}:{lineno}", rec


def iter_records(path: str | Path, strict: bool = True) -> Iterator[dict]:
    """The records of a tree file (`numbered_records` without the origins)."""
    for _, rec in numbered_records(path, strict):
        yield rec


def tree_files(paths: Iterable[str | Path]) -> list[Path]:
    """The tree files named by `paths` (a directory means its trees.jsonl), each once."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "trees.jsonl"
            if not path.is_file():
                raise RstarError(f"{p}: a directory without a trees.jsonl")
        elif not path.is_file():
            raise RstarError(f"{p}: no such tree file or directory")
        real = path.resolve()
        if real not in seen:  # `run/` and `run/trees.jsonl` are one file
            seen.add(real)
            out.append(path)
    return out


def read_trees(paths: Iterable[str | Path]) -> Iterator[tuple[str, dict]]:
    """(origin, record) for every record of every tree file named by `paths` (`tree_files`)."""
    for path in tree_files(paths):
        yield from numbered_records(path)


def run_tree_files(run_dir: str | Path) -> list[Path]:
    """The tree files of a run directory that exist: its trees.jsonl, then those of the extra
    passes run into it (`extra*/trees.jsonl`, as self-evolution's last round does)."""
    run_dir = Path(run_dir)
    paths = [run_dir / "trees.jsonl", *sorted(run_dir.glob("extra*/trees.jsonl"))]
    return [p for p in paths if p.exists()]


def run_records(run_dir: str | Path) -> list[dict]:
    """Every record of a run directory's tree files (`run_tree_files`)."""
    return [rec for path in run_tree_files(run_dir) for rec in iter_records(path)]


def record_by_value(rec: dict) -> bool | None:
    """How the search of a tree-file record settled on its answer, as `best_answer_node`'s
    `by_value` (search.expand): by reward value or by Q, from the record's config (None:
    unknown, decide from the tree)."""
    from rstar.config import SearchConfig, from_dict
    from rstar.search.expand import settles_by_value  # imports the model interface: only here

    search = rec.get("config", {}).get("search")
    return settles_by_value(from_dict(SearchConfig, search)) if search else None


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
