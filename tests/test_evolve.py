"""`rstar evolve --quick` end to end in a real subprocess: killed (kill -9) in the middle,
resumed, and every stage's artifacts checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
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


def quick_evolve_killed_and_resumed(
    run: Path, started: list, stop: threading.Event
) -> tuple[dict, subprocess.CompletedProcess]:
    """`rstar evolve --quick` into RUN, killed (kill -9) once round 1's extraction is done,
    then resumed to the end: (the stages done before the kill, the resumed run). Each process
    is appended to `started` as it starts, and no process starts once `stop` is set (so that
    whoever runs this in a thread can end it).

    conftest.py runs this in a background thread from the moment the test below is collected:
    the run (the suite's longest item) uses one core while the rest of the suite uses the
    other, and the docs tour takes the run's pre-trained base as its `tiny` policy."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_until_then_kill(
        evolve_cmd(run),
        lambda: "round1/extract" in stages(run),
        timeout_s=600,
        poll_s=0.2,
        started=started,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    before = stages(run)
    if stop.is_set():
        raise RuntimeError("the test session ended before the quick run was resumed")
    proc = subprocess.Popen(
        evolve_cmd(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    started.append(proc)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return before, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_quick_evolve_killed_and_resumed(quick_evolve):
    run, before, done = quick_evolve
    assert "round4/eval" not in before
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
    check_search_results(run)  # issue 22: every search's result, not only that its file exists
    check_every_stage_ran_for_real(run, after)  # issue 20


def check_every_stage_ran_for_real(run: Path, stages_: dict) -> None:
    """The quick run proves what it says (issue 20): some training problems solved in every
    round, preference pairs extracted, a PPM trained, and that PPM used by a PPM-augmented round
    (its search started nodes from PPM values) and by the evaluation (best-of-N and MCTS + PPM)."""
    ppm_rounds = []
    for r in range(1, 5):
        extracted = stages_[f"round{r}/extract"]["result"]
        assert extracted["coverage"]["covered"] > 0, f"round {r} solved no training problem"
        if "skipped" not in stages_[f"round{r}/train"]["result"]["ppm"]:
            ppm_rounds.append(r)
    assert sum(stages_[f"round{r}/extract"]["result"]["pairs"] for r in range(1, 5)) > 0
    assert ppm_rounds and ppm_rounds[0] <= 2, f"no PPM before the PPM-augmented rounds: {ppm_rounds}"
    cfg = load_config("quick")
    used = False
    for r in (3, 4):
        if not load_config(cfg.evolve.rounds[r - 1]["preset"]).search.ppm_init:
            continue
        recs = list(iter_records(run / f"round{r}" / "trees.jsonl"))
        assert all(rec["config"]["search"]["ppm_init"] and rec["config"]["model"]["ppm"] for rec in recs)
        # a PPM-initialised node holds the reward model's value
        used |= any(n["value"] is not None for rec in recs for n in rec["tree"]["nodes"][1:])
    assert used, "no PPM-augmented round scored a step with the PPM"
    for r in range(1, 5):
        summary = json.loads((run / f"round{r}" / "eval" / "summary.json").read_text())
        if any(q in ppm_rounds for q in range(1, r + 1)):
            assert {"bon-ppm", "mcts-ppm"} <= set(summary["runs"]), (r, list(summary["runs"]))


def check_search_results(run: Path) -> None:
    """What the searches of a quick run found (issue 22; the quick-preset checks above are the
    artifacts): every tree file loads unchanged, each record's answer is its tree's chosen
    answer, data-generation MCTS trees keep their value invariants, round 4's extra pass
    searched exactly the problems its main pass left unsolved, and best-of-N and MCTS + PPM
    results in the evaluations are the trees' own."""
    from rstar.evaluate import record_by_value
    from rstar.search.expand import best_answer_node
    from test_search import check_tree_invariants

    cfg = load_config("quick")
    n = cfg.evolve.eval_samples
    modes_seen = set()
    for path in sorted(run.glob("round*/**/trees.jsonl")):
        for rec in iter_records(path):
            tree = Tree.from_dict(rec["tree"])
            assert tree.to_dict() == rec["tree"], (path, rec["key"])
            best = best_answer_node(tree, record_by_value(rec))
            assert rec["answer"] == (best.answer if best else None), (path, rec["key"])
            assert rec["correct"] is bool(best is not None and best.correct), (path, rec["key"])
            search = rec["config"]["search"]
            mode = rec["mode"]
            modes_seen.add((path.parent.name, mode))
            if mode == "mcts" and path.parent.name != "mcts-ppm":  # data generation
                check_tree_invariants(tree, ppm_init=search["ppm_init"])
                assert all(a.correct is not None for a in tree.answers())
            elif mode == "mcts":  # evaluation: one search of N rollouts, answers valued by the PPM
                assert search["rollouts"] == n and not search["terminal_guided"]
                assert all(a.value is not None for a in tree.answers())
                check_tree_invariants(tree, ppm_init=True)
            elif mode == "bon":  # N independent chains from the root
                assert len(tree.children(tree.root)) == search["trajectories"] == n
                assert all(len(node.children) <= 1 for node in tree.nodes[1:])
    assert ("mcts-ppm", "mcts") in modes_seen or not (run / "models" / "ppm_r4").exists()
    # round 4's extra pass: unsolved problems of the main pass, unsolved_seeds trees each
    solved = {r["problem"]["id"] for r in iter_records(run / "round4" / "trees.jsonl") if r["correct"]}
    unsolved = {p.id for p in load_problems(run / "problems" / "train.jsonl")} - solved
    extra = run / "round4" / "extra1" / "trees.jsonl"
    if unsolved:
        recs = list(iter_records(extra))
        assert {r["problem"]["id"] for r in recs} == unsolved
        assert len(recs) == cfg.evolve.unsolved_seeds * len(unsolved)
        assert all(r["config"]["search"]["rollouts"] == cfg.evolve.unsolved_rollouts[0] for r in recs)
    else:
        assert not extra.exists()
    # the summaries: MCTS + PPM and best-of-N + PPM wherever a PPM existed
    for r in range(1, 5):
        runs = json.loads((run / f"round{r}" / "eval" / "summary.json").read_text())["runs"]
        has_ppm = any((run / "models" / f"ppm_r{q}").exists() for q in range(1, r + 1))
        assert ({"bon-ppm", "mcts-ppm"} <= set(runs)) == has_ppm, (r, list(runs))


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
