"""`world[:SPLIT][:LEVELS][:N]` wherever a problem set is taken (rstar.data.sets)."""

from __future__ import annotations

import json

import pytest

from rstar.cli import main
from rstar.data.problems import ProblemError
from rstar.data.sets import load_problem_set, parse_world_spec
from rstar.data.world import make_split
from rstar.evaluate import load_benchmark


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("world", ("test", None, 50)),
        ("world:20", ("test", None, 20)),
        ("world:train", ("train", None, 50)),
        ("world:train:3:20", ("train", [3], 20)),
        ("world:test:1-2:5", ("test", [1, 2], 5)),
        ("world:L4", ("test", [4], 50)),
        ("world:train:1,3:2", ("train", [1, 3], 2)),
    ],
)
def test_world_spec_grammar(spec, parsed):
    assert parse_world_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["world:x", "world:train:1:2:3", "world::3", "world:train:a:2", "world:9:9"])
def test_bad_world_specs_say_the_grammar(spec):
    with pytest.raises(ProblemError, match=r"world\[:train\|test\]|levels 1-4"):
        load_problem_set(spec)


def test_world_problems_are_the_splits_problems():
    got = load_problem_set("world:train:3:4")
    assert [p.id for p in got] == [f"world-train:L3:{i}" for i in range(4)]
    assert [p.question for p in got] == [p.question for p in make_split("train", {3: 4})]
    assert {p.level for p in load_problem_set("world:test:1-2:3")} == {"1", "2"}
    assert len(load_problem_set("world:2", limit=5)) == 5
    # eval reads the same spec the same way (it always read world:N as N test problems a level)
    assert [p.id for p in load_benchmark("world:2")] == [p.id for p in load_problem_set("world:test:2")]


def test_rstar_problems_world_writes_a_file_generate_reads(tmp_path, capsys):
    assert main(["problems", "world:train:1:3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["world-train:L1:0", "world-train:L1:1", "world-train:L1:2"]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.id for p in load_problem_set(f)] == [r["id"] for r in rows]  # saved problems keep their ids


def test_an_existing_file_named_world_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "world").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    [p] = load_problem_set("world")
    assert p.answer == "2"
