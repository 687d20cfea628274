"""Problem sets: the authors' eval_data JSON, JSONL, GSM8K-style solutions, hub datasets.

`load_problems(spec)` reads
- a `.json` file holding an array of objects (the authors' `eval_data/*.json`:
  `{"index", "question", "answer"}`), or a JSONL file (`.jsonl`, or `.json` holding one object a
  line), with configurable field names;
- `hf:NAME[:CONFIG][:SPLIT]`, a Hugging Face dataset via `datasets.load_dataset` (for users with
  hub access; offline, a ProblemError says the hub could not be reached). Unless HF_HUB_OFFLINE
  is set, the hub endpoint (`$HF_ENDPOINT`, or the proxy for it) is first probed with a TCP
  connection of a few seconds; when it does not answer, the dataset is looked for in the local
  datasets cache only, instead of spending half a minute in huggingface_hub's retries.

Answers written as GSM8K solutions (`... #### 1,234`) are reduced to the final answer with the
commas removed; the full solution is kept in `meta["solution"]`.

Every problem gets an id unique within the set and stable across runs: `{source}:{index}`,
where source is the file's stem and index is the row's id field (`id_field`, else the authors'
`index` field when rows have one) or else its 0-based position. Rows that are saved Problems
(all the keys of `Problem.to_dict()`: the output of `rstar problems`) keep their own id.
Duplicate questions keep their separate ids (the authors' loader keys problems by question text
and so merges them silently).

The embedded world (`world[:SPLIT][:LEVELS][:N]`) and the `rstar problems` command are in
`rstar.data.sets`, which every command that takes a problem set goes through.

A malformed row raises ProblemError naming the file, the line (JSONL) or index (JSON array,
hub rows) and the field.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rstar import RstarError

# Benchmark files that ship with the package (the authors' eval_data format; see README.md
# beside them for their source and licence): `rstar eval --benchmark math500` works offline.
PACKAGED_BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


@dataclass
class Problem:
    id: str  # unique within a set, stable across runs: f"{source}:{index}"
    question: str
    answer: str  # gold final answer (for GSM8K-style solutions, the part after ####, commas removed)
    level: str | None = None  # difficulty level where the set has one ("Level 3", synthetic levels)
    source: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Problem:
        return Problem(
            id=str(d["id"]),
            question=d["question"],
            answer=d["answer"],
            level=d.get("level"),
            source=d.get("source", ""),
            meta=dict(d.get("meta") or {}),
        )


class ProblemError(RstarError):
    """A problem set that cannot be loaded; the message names file, line/index and field."""


# `#### 72` at the end of a GSM8K solution (the answer may carry commas, $ or a trailing period).
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_final_answer(solution: str) -> str | None:
    """The final answer of a GSM8K-style solution (`... #### 1,234` -> "1234"), else None."""
    m = _GSM8K_ANSWER.search(solution)
    if m is None:
        return None
    ans = m.group(1).strip().replace(",", "")
    if ans.startswith("$"):
        ans = ans[1:].strip()
    return ans.rstrip(".")


def load_problems(
    spec: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    id_field: str | None = None,
    level_field: str = "level",
    split: str = "test",
    limit: int | None = None,
) -> list[Problem]:
    """Load a problem set from a file path or `hf:NAME[:CONFIG][:SPLIT]` (see module docstring)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fields = _Fields(question_field, answer_field, id_field, level_field)
    spec = str(spec)
    if spec.startswith("hf:"):
        source, rows = _hub_rows(spec, split)
    else:
        source, rows = _file_rows(Path(spec))
    problems: list[Problem] = []
    seen: dict[str, str] = {}  # id -> where it was first seen
    for where, pos, row in rows:
        if limit is not None and len(problems) >= limit:
            break
        p = _to_problem(row, where, pos, source, fields)
        if p.id in seen:
            raise ProblemError(f"{where}: duplicate id {p.id!r} (also at {seen[p.id]})")
        seen[p.id] = where
        problems.append(p)
    return problems


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: str
    id: str | None
    level: str


# A row with its location: (description for errors, 0-based position, the object).
_Row = tuple[str, int, Any]


def _file_rows(path: Path) -> tuple[str, Iterator[_Row]]:
    if not path.exists():
        hint = " (a hub dataset is written hf:NAME[:CONFIG][:SPLIT])" if ":" not in str(path) else ""
        raise ProblemError(f"{path}: no such file{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProblemError(f"{path}: cannot read: {e}") from e
    source = path.stem
    if path.suffix.lower() not in (".jsonl", ".ndjson") and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProblemError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from e
        return source, ((f"{path}: index {i}", i, row) for i, row in enumerate(data))
    return source, _jsonl_rows(path, text.splitlines())


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[_Row]:
    pos = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from e
        yield f"{path}: line {lineno}", pos, row
        pos += 1


def _hub_rows(spec: str, split: str) -> tuple[str, Iterator[_Row]]:
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise ProblemError(f"{spec}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:openai/gsm8k:main:test")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else split
    try:
        import datasets
    except ImportError as e:
        raise ProblemError(f"{spec}: loading hub datasets needs the `datasets` package") from e
    env_offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    # datasets reads the variables when it is imported; the environment may have been set since.
    offline = env_offline or bool(datasets.config.HF_HUB_OFFLINE)
    unreachable = None  # why the hub endpoint did not answer the probe
    if not offline:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT  # honours $HF_ENDPOINT
        print(
            f"rstar: fetching the dataset {name} ({spec}) from the Hugging Face hub at {endpoint}; "
            "a local file avoids this (for rstar eval: --data-dir or $RSTAR_DATA_DIR)",
            file=sys.stderr,
            flush=True,
        )
        why = _unreachable(endpoint)
        if why is not None:
            unreachable = f"the hub at {endpoint} could not be reached ({why})"
            print(f"rstar: {unreachable}: looking in the local datasets cache only", file=sys.stderr)
    try:
        with _hub_offline(offline or unreachable is not None):
            ds = datasets.load_dataset(name, config, split=split)
    except ConnectionError as e:
        # datasets raises ConnectionError both offline (HF_HUB_OFFLINE=1) and with no network,
        # unless the dataset is already in the local cache.
        if unreachable is not None:  # the cause would only say that offline mode was on
            reason, cause = unreachable, ""
        else:
            why = "HF_HUB_OFFLINE is set" if offline else "no network or the hub is down"
            reason, cause = f"the Hugging Face hub could not be reached ({why})", f" Cause: {e}"
        raise ProblemError(
            f"{spec}: {reason} and the dataset is not in the local cache; download it where the hub "
            f"is reachable, or pass a local .json/.jsonl file instead (see `rstar problems --help`)."
            f"{cause}"
        ) from e
    except Exception as e:  # unknown name/config/split, broken cache, ...
        raise ProblemError(f"{spec}: could not load the hub dataset: {type(e).__name__}: {e}") from e
    source = name.rsplit("/", 1)[-1] + (f"-{config}" if config else "") + f"-{split}"
    return source, ((f"{spec}: row {i}", i, row) for i, row in enumerate(ds))


# How long the hub endpoint may take to accept a TCP connection (DNS included) before the dataset
# is looked for in the local cache only (huggingface_hub's own retries take about 30 s).
HUB_PROBE_S = 3.0


def _unreachable(endpoint: str, timeout: float = HUB_PROBE_S) -> str | None:
    """None when a TCP connection to the endpoint's host (or to the proxy the environment names
    for it) opens within `timeout` seconds, else why not. An endpoint with no host: None."""
    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname:
        return None
    default_port = 443 if url.scheme == "https" else 80
    try:
        host, port = url.hostname, url.port or default_port
    except ValueError:  # a port that is not a number: let datasets report it
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        try:
            if p.hostname:
                host, port = p.hostname, p.port or (443 if p.scheme == "https" else 80)
        except ValueError:
            return None
    where = f"{host}:{port}" if host == url.hostname else f"the proxy {host}:{port}"
    result: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t = threading.Thread(target=connect, name="rstar-hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        return f"no connection to {where} within {timeout:g} s"
    return None if result[0] is None else f"{where}: {result[0]}"


@contextmanager
def _hub_offline(on: bool) -> Iterator[None]:
    """Within the block, datasets and huggingface_hub work from the local cache only (their
    offline mode, as HF_HUB_OFFLINE=1 gives it, read from these module attributes at call time);
    the previous values are restored after."""
    if not on:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _field_str(row: dict, key: str, where: str, *, allow_number: bool) -> str:
    if key not in row:
        raise ProblemError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    value = row[key]
    if isinstance(value, str):
        return value
    if allow_number and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. AIME answers stored as integers
    kind = "a string or a number" if allow_number else "a string"
    raise ProblemError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")


# The keys of `Problem.to_dict()`: a row with all of them is a saved Problem (from `rstar
# problems`, or the synthetic world's files) and loads back unchanged, its id included.
_PROBLEM_KEYS = frozenset({"id", "question", "answer", "level", "source", "meta"})


def _to_problem(row: Any, where: str, pos: int, source: str, f: _Fields) -> Problem:
    if not isinstance(row, dict):
        raise ProblemError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = _field_str(row, f.question, where, allow_number=False)
    if not question.strip():
        raise ProblemError(f"{where}: field {f.question!r} is empty")
    raw_answer = _field_str(row, f.answer, where, allow_number=True)
    saved = f.id is None and _PROBLEM_KEYS <= row.keys()
    if saved:
        if not isinstance(row["meta"], dict):
            raise ProblemError(f"{where}: field 'meta' must be an object")
        meta = {**row["meta"], **{k: v for k, v in row.items() if k not in _PROBLEM_KEYS}}
        source = "" if row["source"] is None else str(row["source"])
    else:
        meta = {k: v for k, v in row.items() if k not in (f.question, f.answer, f.id, f.level)}
    answer = raw_answer.strip()
    if "####" in answer:
        final = gsm8k_final_answer(answer)
        if not final:
            raise ProblemError(f"{where}: field {f.answer!r} has '####' but no answer after it")
        meta["solution"] = raw_answer
        answer = final
    if not answer:
        raise ProblemError(f"{where}: field {f.answer!r} is empty")

    if saved:
        pid = _field_str(row, "id", where, allow_number=True)
    else:
        if f.id is not None:
            index = _field_str(row, f.id, where, allow_number=True)
        elif "index" in row and isinstance(row["index"], int | str) and not isinstance(row["index"], bool):
            index = str(row["index"])  # the authors' eval_data numbering
            meta.pop("index", None)
        else:
            index = str(pos)
        pid = f"{source}:{index}"
    level = row.get(f.level)
    if level is not None and not isinstance(level, str | int):
        raise ProblemError(f"{where}: field {f.level!r} must be a string or an integer")
    return Problem(
        id=pid,
        question=question,
        answer=answer,
        level=None if level is None else str(level),
        source=source,
        meta=meta,
    )
