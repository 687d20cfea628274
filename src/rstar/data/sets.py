"""Problem sets by name: a file, a hub dataset, or the embedded synthetic world.

`load_problem_set(spec)` is what every command that takes a problem set calls (`rstar problems`,
`rstar generate --problems`, `rstar eval --benchmark`): `rstar.data.problems.load_problems` for
files and `hf:` specs, and for the embedded world (`rstar.data.world`), generated on the spot:

    world[:SPLIT][:LEVELS][:N]

- SPLIT: `train` or `test` (default `test`; the two never share a question);
- LEVELS: one level (`3`), a range (`1-2`) or a list (`1,3`), optionally written with an `L`
  (`L3`); default: every level;
- N: problems per level (default 50).

A lone number is N (`world:20`: 20 test problems per level, as `rstar eval --benchmark world:20`
always read it); two numbers are LEVELS then N (`world:train:3:20`: 20 training problems of
level 3). The same spec gives the same problems on every machine (`make_split`, seed 0), with
ids `world-{split}:L{level}:{i}`. An existing file of that name wins over the world.

This lives apart from `rstar.data.problems` because the world's generator builds `Problem`s
from that module: the world imports it, so it cannot import the world back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from rstar.data.problems import Problem, ProblemError, load_problems

WORLD_DEFAULT_PER_LEVEL = 50
_LEVELS = re.compile(r"^[Ll]?(\d+)(?:-(\d+))?((?:,\d+)*)$")


def is_world_spec(spec: str | Path) -> bool:
    s = str(spec)
    return (s == "world" or s.startswith("world:")) and not Path(s).exists()


def parse_world_spec(spec: str) -> tuple[str, list[int] | None, int]:
    """`world[:SPLIT][:LEVELS][:N]` -> (split, levels or None for all, problems per level)."""
    parts = [p for p in str(spec).split(":")[1:]]
    split = "test"
    if parts and parts[0] in ("train", "test"):
        split = parts.pop(0)
    levels: list[int] | None = None
    n = WORLD_DEFAULT_PER_LEVEL
    usage = f"{spec}: expected world[:train|test][:LEVELS][:N], e.g. world:train:1-2:20"
    if any(not p for p in parts) or len(parts) > 2:
        raise ProblemError(usage)
    if len(parts) == 2 or (parts and parts[0][:1] in "Ll"):
        m = _LEVELS.match(parts.pop(0))
        if not m:
            raise ProblemError(usage)
        lo = int(m.group(1))
        levels = list(range(lo, int(m.group(2)) + 1)) if m.group(2) else [lo]
        levels += [int(x) for x in m.group(3).split(",") if x]
    if parts:
        if not parts[0].isdigit():
            raise ProblemError(usage)
        n = int(parts[0])
    return split, levels, n


def world_problems(spec: str) -> list[Problem]:
    from rstar.data.world import WorldConfig, make_split

    split, levels, n = parse_world_spec(spec)
    world = WorldConfig()
    if levels is not None:
        bad = [lv for lv in levels if not 1 <= lv <= world.n_levels]
        if bad:
            raise ProblemError(f"{spec}: the world has levels 1-{world.n_levels}, not {bad[0]}")
    counts = {lv: n for lv in (levels or range(1, world.n_levels + 1))}
    return make_split(split, counts, world)


def load_problem_set(spec: str | Path, *, limit: int | None = None, **fields: Any) -> list[Problem]:
    """A problem set from a file, `hf:NAME[:CONFIG][:SPLIT]` or `world[:SPLIT][:LEVELS][:N]`."""
    if is_world_spec(spec):
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return world_problems(str(spec))[:limit]  # [:None] keeps all
    return load_problems(spec, limit=limit, **fields)


# ----------------------------------------------------------------------------------------------
# CLI: `rstar problems SPEC`.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec",
        help="a .json/.jsonl file, hf:NAME[:CONFIG][:SPLIT] (needs hub access), or the embedded world: "
        "world[:train|test][:LEVELS][:N], e.g. world:train:1-2:20 (N per level, default 50)",
    )
    parser.add_argument("--limit", type=int, default=None, help="load at most N problems")
    parser.add_argument("--question-field", default="question", help="field holding the question")
    parser.add_argument("--answer-field", default="answer", help="field holding the answer or GSM8K solution")
    parser.add_argument(
        "--id-field", default=None, help="field holding a per-row id (default: index/position)"
    )
    parser.add_argument("--level-field", default="level", help="field holding the difficulty level")
    parser.add_argument("--split", default="test", help="hub split when SPEC does not name one")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        problems = load_problem_set(
            args.spec,
            question_field=args.question_field,
            answer_field=args.answer_field,
            id_field=args.id_field,
            level_field=args.level_field,
            split=args.split,
            limit=args.limit,
        )
    except (ProblemError, ValueError) as e:
        print(f"rstar problems: error: {e}", file=sys.stderr)
        return 2
    try:
        for p in problems:
            sys.stdout.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `rstar problems ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
