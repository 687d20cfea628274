"""Problem sets (rstar.data.problems): the four benchmark files read in place, JSONL with custom
fields, GSM8K `####` answers, malformed rows, duplicates, and the hub path offline or with the hub
unreachable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BENCHMARKS
from rstar.cli import main as cli_main
from rstar.data.problems import Problem, ProblemError, gsm8k_final_answer, load_problems

BENCH = BENCHMARKS


@pytest.mark.parametrize(
    "name, count",
    [
        ("math500_test.json", 500),
        ("aime2024_test.json", 30),
        ("amc23_test.json", 40),
        ("GSM8K_test.json", 1319),
    ],
)
def test_benchmark_files_load_with_the_right_count(name, count):
    path = BENCH / name
    problems = load_problems(str(path))
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert [p.id for p in problems] == [f"{path.stem}:{r['index']}" for r in raw]
    assert [(p.question, p.answer) for p in problems] == [(r["question"], r["answer"].strip()) for r in raw]
    assert all(p.source == path.stem and p.level is None for p in problems)
    assert load_problems(str(path), limit=7) == problems[:7]


def test_math500_answers_are_latex_as_written():
    path = BENCH / "math500_test.json"
    p = load_problems(str(path), limit=1)[0]
    assert p.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_jsonl_with_custom_field_names(tmp_path):
    f = _write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"uid": "a7", "problem": "What is 2+3?", "solution": "5", "difficulty": 2, "subject": "arith"},
            "",  # blank lines are skipped
            {"uid": "b9", "problem": "Half of 1?", "solution": "\\frac{1}{2}", "difficulty": "Level 3"},
        ],
    )
    ps = load_problems(
        str(f), question_field="problem", answer_field="solution", id_field="uid", level_field="difficulty"
    )
    assert [p.id for p in ps] == ["mine:a7", "mine:b9"]
    assert [p.question for p in ps] == ["What is 2+3?", "Half of 1?"]
    assert [p.answer for p in ps] == ["5", "\\frac{1}{2}"]
    assert [p.level for p in ps] == ["2", "Level 3"]
    assert ps[0].meta == {"subject": "arith"}
    # without an id field (and no `index`), ids are the 0-based positions
    ps = load_problems(str(f), question_field="problem", answer_field="solution")
    assert [p.id for p in ps] == ["mine:0", "mine:1"]
    assert ps[0].meta["uid"] == "a7"


def test_gsm8k_solutions_reduce_to_the_final_answer(tmp_path):
    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    f = _write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "How many clips?", "answer": sol},
            {"question": "How much money?", "answer": "Total is 1,234 dollars.\n#### 1,234"},
            {"question": "Negative?", "answer": "so\n####  -5 "},
        ],
    )
    ps = load_problems(str(f))
    assert [p.answer for p in ps] == ["72", "1234", "-5"]
    assert ps[0].meta["solution"] == sol
    assert gsm8k_final_answer("x\n#### $1,000.") == "1000"
    assert gsm8k_final_answer("no marker") is None


def test_duplicate_questions_keep_distinct_ids(tmp_path):
    f = tmp_path / "dup.json"
    f.write_text(
        json.dumps(
            [
                {"index": 0, "question": "What is 1+1?", "answer": "2"},
                {"index": 1, "question": "What is 1+1?", "answer": "2"},
                {"index": 2, "question": "What is 1+1?", "answer": "two"},
            ]
        )
    )
    ps = load_problems(str(f))
    assert [p.id for p in ps] == ["dup:0", "dup:1", "dup:2"]
    assert len({p.question for p in ps}) == 1
    # the same file loads to the same ids again (stable across runs)
    assert [p.id for p in load_problems(str(f))] == ["dup:0", "dup:1", "dup:2"]


def test_duplicate_ids_are_an_error(tmp_path):
    f = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"id": 1, "question": "a?", "answer": "1"}, {"id": 1, "question": "b?", "answer": "2"}],
    )
    with pytest.raises(ProblemError, match=r"d\.jsonl: line 2: duplicate id 'd:1' \(also at .*line 1\)"):
        load_problems(str(f), id_field="id")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q", "answer": "1"}, {"answer": "2"}], r"line 2: missing field 'question'"),
        ([{"question": "q", "answer": "1"}, {"question": "q2"}], r"line 2: missing field 'answer'"),
        ([{"question": "q", "answer": "1"}, '{"question": "q2", "answer": '], r"line 2: not valid JSON"),
        (
            [{"question": "q", "answer": "1"}, {"question": 7, "answer": "2"}],
            r"line 2: field 'question' must be a string, got int",
        ),
        (
            [{"question": "q", "answer": "1"}, {"question": "q", "answer": None}],
            r"line 2: field 'answer' must be",
        ),
        (
            [{"question": "q", "answer": "1"}, {"question": "  ", "answer": "2"}],
            r"line 2: field 'question' is empty",
        ),
        ([{"question": "q", "answer": "1"}, ["q", "1"]], r"line 2: expected a JSON object, got list"),
        (
            [{"question": "q", "answer": "1"}, {"question": "q", "answer": "x ####"}],
            r"line 2: field 'answer' has '####'",
        ),
    ],
)
def test_malformed_jsonl_rows_name_file_line_and_field(tmp_path, rows, message):
    f = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ProblemError, match=r"bad\.jsonl: " + message):
        load_problems(str(f))


def test_malformed_json_array_rows_name_file_index_and_field(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(
        json.dumps(
            [{"index": 0, "question": "q", "answer": "1"}, {"index": 1, "question": ["q"], "answer": "2"}]
        )
    )
    with pytest.raises(
        ProblemError, match=r"bad\.json: index 1: field 'question' must be a string, got list"
    ):
        load_problems(str(f))
    f.write_text('[{"index": 0, "question": "q", "answer": "1"},\n {"index": 1 "question": "q"}]')
    with pytest.raises(ProblemError, match=r"bad\.json: line 2: not valid JSON"):
        load_problems(str(f))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProblemError, match="no such file"):
        load_problems(str(tmp_path / "nope.json"))


def test_problem_round_trips_through_dict():
    p = Problem(id="s:3", question="q", answer="a", level="Level 2", source="s", meta={"k": [1, 2]})
    assert Problem.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert Problem.from_dict({"id": "x:0", "question": "q", "answer": "1"}) == Problem("x:0", "q", "1")


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_saved_problems_load_back_unchanged(tmp_path):
    ps = [
        Problem(
            id="world:L2:7", question="What is 2+3?", answer="5", level="2", source="world", meta={"k": 1}
        ),
        Problem(id="mine:x", question="What is 2+3?", answer="5"),  # a duplicate question
    ]
    f = _write_jsonl(tmp_path / "saved.jsonl", [p.to_dict() for p in ps])
    assert load_problems(str(f)) == ps


def test_hub_dataset_offline_gives_a_clear_error(tmp_path):
    # In a subprocess: huggingface_hub reads HF_HUB_OFFLINE when it is imported. An empty cache
    # makes sure nothing is found locally.
    env = {**_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = subprocess.run(
        [sys.executable, "-m", "rstar.cli", "problems", "hf:openai/gsm8k:main:test", "--limit", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert (
        "hf:openai/gsm8k:main:test: the Hugging Face hub could not be reached (HF_HUB_OFFLINE is set)"
        in p.stderr
    )
    assert "local .json/.jsonl file" in p.stderr


def _closed_port() -> int:
    """A loopback port that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unreachable_hub_env(tmp_path) -> tuple[dict[str, str], str]:
    """The environment of a machine whose hub endpoint does not answer, with its own cache."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = {
        k: v
        for k, v in _env().items()
        if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    return env, endpoint


# Times only the load (importing datasets takes a while of its own on a busy machine).
_TIMED_LOAD = """
import json, sys, time
import datasets
from rstar.data.problems import ProblemError, load_problems
t = time.monotonic()
try:
    out = {"ids": [p.id for p in load_problems(sys.argv[1])]}
except ProblemError as e:
    out = {"error": str(e)}
print(json.dumps({**out, "seconds": time.monotonic() - t}))
"""


def _timed_load(spec: str, env: dict) -> tuple[dict, str]:
    """`load_problems(spec)` in a child Python with `env`: its JSON result (ids or error, and
    the seconds the load took) and its stderr."""
    p = subprocess.run(
        [sys.executable, "-c", _TIMED_LOAD, spec], capture_output=True, text=True, env=env, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def test_hub_unreachable_fails_fast_and_names_the_endpoint(tmp_path):
    # huggingface_hub retries a hub it cannot reach for about 30 s; a refused connection to
    # $HF_ENDPOINT is seen by the probe at once and the dataset looked for in the cache only.
    env, endpoint = _unreachable_hub_env(tmp_path)
    out, stderr = _timed_load("hf:openai/gsm8k:main:test", env)
    assert out["seconds"] < 8, out
    assert f"the hub at {endpoint} could not be reached" in out["error"]
    assert "not in the local cache" in out["error"]
    assert "Retrying" not in stderr
    # Before the hub is asked, one line names the dataset and the ways around the hub.
    assert (
        f"fetching the dataset openai/gsm8k (hf:openai/gsm8k:main:test) from the Hugging Face hub at {endpoint}"
        in stderr
    )
    assert "--data-dir or $RSTAR_DATA_DIR" in stderr


def test_hub_unreachable_still_loads_a_cached_dataset(tmp_path):
    # A dataset in the local datasets cache (written by datasets' own JSON builder, in the layout
    # a hub download leaves: NAMESPACE___NAME/CONFIG/VERSION/HASH) loads with the hub unreachable.
    env, _ = _unreachable_hub_env(tmp_path)
    rows = tmp_path / "rows.jsonl"
    _write_jsonl(rows, [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)])
    make_cache = """
import os, sys
from datasets.packaged_modules.json.json import Json
cache, rows = sys.argv[1], sys.argv[2]
b = Json(cache_dir=cache, dataset_name="tiny", config_name="main", data_files={"test": rows})
b.download_and_prepare()
final = os.path.join(cache, "someone___tiny", "main", "0.0.0", "0123456789abcdef")
os.makedirs(os.path.dirname(final))
os.rename(b.cache_dir, final)
"""
    cache = str(tmp_path / "hf" / "datasets")
    subprocess.run([sys.executable, "-c", make_cache, cache, str(rows)], env=env, check=True, timeout=120)
    out, stderr = _timed_load("hf:someone/tiny:main:test", env)
    assert out.get("ids") == ["tiny-main-test:0", "tiny-main-test:1", "tiny-main-test:2"], (out, stderr)
    assert out["seconds"] < 8, out
    assert "could not be reached" in stderr and "local datasets cache only" in stderr


def test_hub_spec_syntax_error():
    with pytest.raises(ProblemError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
        load_problems("hf:")


def test_cli_prints_one_json_line_per_problem(tmp_path, capsys):
    f = _write_jsonl(tmp_path / "c.jsonl", [{"q": f"Q{i}?", "a": f"{i} apples\n#### {i}"} for i in range(5)])
    assert cli_main(["problems", str(f), "--limit", "3", "--question-field", "q", "--answer-field", "a"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["id"], x["question"], x["answer"]) for x in lines] == [
        ("c:0", "Q0?", "0"),
        ("c:1", "Q1?", "1"),
        ("c:2", "Q2?", "2"),
    ]
    assert Problem.from_dict(lines[0]).meta["solution"] == "0 apples\n#### 0"


def test_cli_error_exit_code(tmp_path, capsys):
    f = _write_jsonl(tmp_path / "e.jsonl", [{"question": "q"}])
    assert cli_main(["problems", str(f)]) == 2
    assert "e.jsonl: line 1: missing field 'answer'" in capsys.readouterr().err
