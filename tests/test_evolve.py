"""`rstar evolve --quick` end to end in a real subprocess: killed (kill -9) in the middle,
resumed, and every stage's artifacts checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.killing import run_until_then_kill
from rstar import RstarError
from rstar.config import load_config
from rstar.data.extract import coverage_by_steps
from rstar.data.problems import Problem, load_problems
from rstar.evolve import RunState
from rstar.search.tree import Tree
from rstar.search.treefile import iter_records


def evolve_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "rstar.cli", "evolve", "--quick", "--run-dir", str(run)]


def stages(run: Path) -> dict:
    try:
        return json.loads((run / "state.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_quick_evolve_killed_and_resumed(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_until_then_kill(
        evolve_cmd(run),
        lambda: "round1/extract" in stages(run),
        timeout_s=600,
        poll_s=0.2,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    before = stages(run)
    assert "round4/eval" not in before

    done = subprocess.run(evolve_cmd(run), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    after = stages(run)
    for name, info in before.items():  # finished stages were not run again
        assert after[name] == info
    expected = ["problems", "pretrain", "eval_base"] + [
        f"round{r}/{s}" for r in range(1, 5) for s in ("generate", "extract", "train", "eval")
    ]
    assert list(after) == expected

    # problems and the seed set
    train = load_problems(run / "problems" / "train.jsonl")
    test = load_problems(run / "problems" / "test.jsonl")
    assert {p.level for p in train} == {"1", "2", "3", "4"} and test
    seed = [json.loads(x) for x in (run / "problems" / "seed_sft.jsonl").read_text().splitlines()]
    assert seed and not {r["query"] for r in seed} & {p.question for p in train}

    seed_queries = {r["query"] for r in seed}
    kept_seed = []  # the seed sample mixed into each round's SFT set (evolve.sft_seed_records)

    models = run / "models"
    for r in range(1, 5):
        rd = run / f"round{r}"
        recs = list(iter_records(rd / "trees.jsonl"))
        keys = [rec["key"] for rec in recs]
        assert sorted(keys) == sorted(f"{p.id}#0" for p in train)  # every problem once
        for rec in recs:
            Tree.from_dict(rec["tree"])
        assert (rd / "sft.jsonl").exists() and (rd / "pairs.jsonl").exists()
        sft = [json.loads(x) for x in (rd / "sft.jsonl").read_text().splitlines()]
        kept_seed.append(sorted(x["query"] for x in sft if x["query"] in seed_queries))
        assert len(kept_seed[-1]) == 40 < len(seed)  # quick.yaml: sft_seed_records 40
        assert json.loads((models / f"policy_r{r}" / "config.json").read_text())["model_type"] == "qwen2"
        trained = after[f"round{r}/train"]["result"]
        pairs_so_far = sum(
            len((run / f"round{q}" / "pairs.jsonl").read_text().splitlines()) for q in range(1, r + 1)
        )
        if "skipped" in trained["ppm"]:
            assert pairs_so_far == 0
        else:
            assert trained["ppm"]["pairs"] == pairs_so_far  # quick.yaml: ppm_pair_rounds 0 (all rounds)
            assert (
                json.loads((models / f"ppm_r{r}" / "config.json").read_text())["rstar_reward"]["kind"]
                == "ppm"
            )
        summary = json.loads((rd / "eval" / "summary.json").read_text())
        assert "greedy" in summary["runs"]
        # coverage by the reference solution's length: the same problems and the same covered count
        extracted = after[f"round{r}/extract"]["result"]
        by_steps = extracted["coverage_by_steps"]
        assert sum(v["problems"] for v in by_steps.values()) == len(train)
        assert sum(v["covered"] for v in by_steps.values()) == extracted["coverage"]["covered"]

    assert all(k == kept_seed[0] for k in kept_seed)  # the same sample in every round

    report = json.loads((run / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert all("coverage" in r["coverage"] for r in report["rounds"])
    md = (run / "report.md").read_text()
    assert "coverage" in md and "Test accuracy" in md and (run / "report.png").stat().st_size > 10_000
    assert "## Time per stage" in md
    assert "## Coverage by the reference solution's length" in md


def test_run_dir_with_another_runs_artifacts_is_refused(tmp_path):
    """A directory with round/model folders but no state.json is not a run to resume: its
    tree files would be mixed into this run's searches (stale trees, other models)."""
    cfg = load_config("quick")
    (tmp_path / "notes.txt").write_text("a user's own file is fine")
    RunState(tmp_path, cfg)  # a fresh run: writes state.json
    assert (tmp_path / "state.json").exists()
    stale = tmp_path / "stale"
    (stale / "round0" / "eval" / "greedy").mkdir(parents=True)
    (stale / "round0" / "eval" / "greedy" / "trees.jsonl").write_text("{}\n")
    with pytest.raises(RstarError, match=r"stale holds run artifacts \(round0\) but no state.json"):
        RunState(stale, cfg)
    assert (stale / "round0" / "eval" / "greedy" / "trees.jsonl").read_text() == "{}\n"  # nothing lost


def test_coverage_by_steps_counts_reference_solution_lengths():
    from rstar.data.world import make_split

    problems = make_split("train", {1: 3, 4: 3}, seed=5)
    solved = {problems[0].id, problems[4].id}
    by = coverage_by_steps(problems, solved)
    lengths = {p.id: p.meta["solution"].count("<end_of_step>") for p in problems}
    for n, row in by.items():
        ids = [pid for pid, k in lengths.items() if k == int(n)]
        assert row == {
            "problems": len(ids),
            "covered": len(set(ids) & solved),
            "coverage": len(set(ids) & solved) / len(ids),
        }
    assert sum(row["problems"] for row in by.values()) == 6
    # problems without a step-format reference (a GSM8K text solution, none at all) are left out
    text = Problem(id="gsm:0", question="q", answer="3", meta={"solution": "1 + 2 = 3\n#### 3"})
    assert coverage_by_steps([text, Problem(id="x", question="q", answer="1")], {"gsm:0"}) == {}
