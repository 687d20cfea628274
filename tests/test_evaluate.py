"""Evaluation metrics on hand-made trajectories where the right verdicts are known, and
trajectories read from real tree records."""

from __future__ import annotations

import json

import pytest

from conftest import BENCHMARKS
from rstar.evaluate import (
    Trajectory,
    metrics_at_budgets,
    scaling_plot,
    select,
    summary_table,
    trajectories,
    within,
)
from rstar.grading import Grader
from rstar.search.tree import ANSWER, Tree


def T(answer, score, correct, order=0):
    return Trajectory(answer, score, correct, order)


def exact(a, b):
    return a == b


def test_majority_best_of_n_and_top_k_vote():
    trajs = [
        T("7", 0.9, False, 0),  # the single best-scored answer is wrong
        T("5", 0.8, True, 1),
        T("5", 0.7, True, 2),
        T("9", -0.5, False, 3),
        T("9", -0.6, False, 4),
        T("9", -0.7, False, 5),
    ]
    v = select(trajs, top_k=3, same=exact)
    assert v["majority"] is False  # "9" has 3 votes
    assert v["best_of_n"] is False  # "7" scores highest
    assert v["topk_vote"] is True  # top-3 by score: 7, 5, 5 -> "5"
    assert v["topk_weighted"] is True
    assert v["pass"] is True


def test_weighted_vote_differs_from_unweighted():
    trajs = [T("1", 0.95, True), T("2", -0.9, False), T("2", -0.9, False)]
    v = select(trajs, top_k=3, same=exact)
    assert v["topk_vote"] is False and v["topk_weighted"] is True  # 1.95 > 2 * 0.1


def test_answers_vote_by_equivalence_not_by_string():
    with Grader(timeout_s=5) as g:
        trajs = [T("3", 0.2, False), T("0.5", 0.1, True), T(r"\frac{1}{2}", 0.1, True)]
        assert select(trajs, 3, lambda a, b: g.grade(a, b))["majority"] is True
        assert select(trajs, 3, exact)["majority"] is False  # as strings: a 3-way tie, "3" came first


def test_budgets_reuse_one_run_and_levels():
    per_problem = {
        "a": ({"id": "a", "level": "1"}, [T("1", 0.1, False, 0), T("2", 0.9, True, 1)]),
        "b": ({"id": "b", "level": "2"}, [T("3", 0.5, True, 0), T("4", 0.1, False, 1)]),
    }
    m = metrics_at_budgets(per_problem, [1, 2], top_k=1, same=exact)
    assert m[1]["best_of_n"] == 0.5 and m[2]["best_of_n"] == 1.0
    assert m[1]["pass"] == 0.5 and m[2]["pass"] == 1.0
    assert m[2]["levels"]["1"]["best_of_n"] == 1.0 and m[1]["levels"]["1"]["best_of_n"] == 0.0
    assert m[2]["n"] == 2
    assert [t.order for t in within(per_problem["a"][1], 1)] == [0]


def _record(mode: str, tree: Tree, index: int = 0) -> dict:
    return {
        "key": f"p#{index}",
        "mode": mode,
        "search_index": index,
        "problem": {"id": "p"},
        "tree": tree.to_dict(),
    }


def test_trajectories_from_records():
    tree = Tree.new("q", "p")
    a = tree.add_child(tree.root, "a", kind="answer", terminal=ANSWER, answer="1", correct=False, value=0.2)
    b = tree.add_child(tree.root, "b", kind="answer", terminal=ANSWER, answer="2", correct=True, value=0.8)
    a.rollout, b.rollout = 3, 0
    a.N, b.N = 1, 1
    bon = trajectories(_record("bon", tree))
    assert [t.answer for t in bon] == ["1", "2"] and [t.order for t in bon] == [0, 1]
    by_rollout = trajectories(_record("mcts", tree), unit="rollouts")
    assert [(t.answer, t.order) for t in by_rollout] == [("2", 0), ("1", 3)]
    [best] = trajectories(_record("mcts", tree, index=5), unit="searches")
    assert (best.answer, best.score, best.correct, best.order) == ("2", 0.8, True, 5)


def test_plot_and_table(tmp_path):
    summary = {
        "runs": {
            "mcts-ppm": {"mode": "mcts", "reward": "ppm", "metrics": {1: _m(0.3), 4: _m(0.6)}},
            "bon-ppm": {"mode": "bon", "reward": "ppm", "metrics": {1: _m(0.3), 4: _m(0.4)}},
            "greedy": {"mode": "greedy", "reward": "", "metrics": {1: _m(0.2)}},
        }
    }
    path = scaling_plot(summary, tmp_path / "s.png")
    assert path.stat().st_size > 5000
    table = summary_table(summary)
    assert "| mcts-ppm | mcts | ppm | 4 | 60.0" in table and "| greedy | greedy | - | 1 | 20.0" in table


def _m(x: float) -> dict:
    return {
        "majority": x,
        "best_of_n": x,
        "topk_vote": x,
        "topk_weighted": x,
        "pass": x,
        "n": 10,
        "levels": {},
    }


@pytest.mark.parametrize("name", ["math500", "aime2024", "amc23", "gsm8k"])
def test_benchmarks_by_name_from_a_local_directory(name, tmp_path, monkeypatch):
    from rstar.evaluate import BENCHMARKS as NAMED
    from rstar.evaluate import load_benchmark

    # With no network and no data directory, the packaged file answers (the hub is never
    # asked: HF_HUB_OFFLINE would make it fail).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RSTAR_DATA_DIR", raising=False)
    packaged = load_benchmark(name, limit=3)
    assert len(packaged) == 3 and all(p.question and p.answer for p in packaged)
    # A data directory wins over the packaged file.
    rows = [{"index": 7, "question": "What is 1 + 1?", "answer": "2"}]
    (tmp_path / NAMED[name]["file"]).write_text(json.dumps(rows))
    mine = load_benchmark(name, data_dir=str(tmp_path))
    assert [(p.question, p.answer) for p in mine] == [("What is 1 + 1?", "2")]
    monkeypatch.setenv("RSTAR_DATA_DIR", str(tmp_path))
    assert [p.question for p in load_benchmark(name, limit=3)] == ["What is 1 + 1?"]
    assert load_benchmark(name, data_dir=str(BENCHMARKS), limit=3) == packaged


def test_a_named_benchmark_with_no_file_offline_names_the_ways_to_supply_it(monkeypatch):
    from rstar import RstarError
    from rstar.evaluate import load_benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("RSTAR_DATA_DIR", raising=False)
    with pytest.raises(RstarError, match=r"olympiadbench_test\.json.*--data-dir.*RSTAR_DATA_DIR"):
        load_benchmark("olympiadbench")


def test_inference_mcts_uses_step_values_whatever_the_preset():
    """Evaluation's MCTS + PPM is the paper's inference search: every step starts from its
    PPM value and the answer's PPM score is backed up, even from a data-generation preset."""
    from rstar.config import load_config
    from rstar.evaluate import eval_search_config

    for preset in ("embedded", "round2", "eval"):
        s = eval_search_config(load_config(preset).search, "mcts", 8, "searches")
        assert (s.mode, s.ppm_init, s.terminal_guided, s.trajectories) == ("mcts", True, False, 8)
        s = eval_search_config(load_config(preset).search, "mcts", 8, "rollouts")
        assert (s.rollouts, s.trajectories) == (8, 1)
        s = eval_search_config(load_config(preset).search, "bon", 8, "rollouts")
        assert (s.mode, s.trajectories) == ("bon", 8)
        assert eval_search_config(load_config(preset).search, "greedy", 8, "searches").trajectories == 1


# --- None answers, ties, and runs of every search mode (issue 22) ------------------------------


def test_none_answers_never_vote_and_never_win():
    assert all(v is False for v in select([], 2, exact).values())
    nothing = [T(None, 0.9, False, 0), T(None, None, False, 1)]
    assert all(v is False for v in select(nothing, 2, exact).values())
    # two unanswered searches score highest; the one answer scores lowest
    trajs = [T(None, 0.9, False, 0), T(None, 0.8, False, 1), T("5", -0.5, True, 2)]
    v = select(trajs, top_k=2, same=exact)
    assert v["majority"] is True  # the only answer with votes, though outnumbered by None
    assert v["best_of_n"] is False  # the best-scored trajectory has no answer: nothing picked
    assert v["topk_vote"] is False and v["topk_weighted"] is False  # no answer in the top 2
    assert select(trajs, top_k=3, same=exact)["topk_vote"] is True
    # None answers are distinct: they are never one class with each other or with an answer
    same_calls = []
    select(
        [T(None, 0.1, False), T(None, 0.2, False), T("1", 0.3, True)],
        3,
        lambda a, b: same_calls.append((a, b)),
    )
    assert same_calls == []


def test_ties_go_to_the_answer_reached_first():
    first_right = [T("3", 0.1, True, 0), T("4", 0.1, False, 1), T("4", 0.2, False, 2), T("3", 0.2, True, 3)]
    first_wrong = [T("4", 0.1, False, 0), T("3", 0.1, True, 1), T("3", 0.2, True, 2), T("4", 0.2, False, 3)]
    for trajs, want in ((first_right, True), (first_wrong, False)):
        v = select(trajs, top_k=4, same=exact)
        assert v["majority"] is want and v["topk_vote"] is want
    # equal scores: best-of-N takes the earlier trajectory; a missing score counts as -1
    assert select([T("1", 0.5, True), T("2", 0.5, False)], 1, exact)["best_of_n"] is True
    assert select([T("2", 0.5, False), T("1", 0.5, True)], 1, exact)["best_of_n"] is False
    assert select([T("2", None, False), T("1", -0.99, True)], 1, exact)["best_of_n"] is True
    assert select([T("2", None, False), T("1", -1.0, True)], 1, exact)["best_of_n"] is False
    # weighted: a score of -1 still votes (shifted to a small positive weight)
    v = select([T("2", -1.0, False), T("1", None, True), T("1", None, True)], 3, exact)
    assert v["topk_weighted"] is True and v["best_of_n"] is False


def test_selected_answers_and_the_pass_rule():
    from rstar.evaluate import _choices

    answers, correct = _choices([T("7", 0.9, False), T("5", 0.1, True), T("5", 0.2, True)], 2, exact)
    assert answers == {
        "majority": "5",
        "best_of_n": "7",
        "topk_vote": "7",
        "topk_weighted": "7",
        "pass": None,
    }
    assert correct == {
        "majority": True,
        "best_of_n": False,
        "topk_vote": False,
        "topk_weighted": False,
        "pass": True,
    }
    # top-2 with a tie in votes: the first to reach the top (by order in the list) wins
    assert (
        _choices([T("7", 0.9, False), T("5", 0.8, True), T("5", 0.1, True)], 2, exact)[0]["topk_vote"] == "7"
    )
    # an equivalence, not a string match, decides the classes; the answer picked is the first spelling
    answers, _ = _choices(
        [T("0.5", 0.1, True), T("1/2", 0.9, True), T("2", 0.5, False)],
        3,
        lambda a, b: {a, b} == {"0.5", "1/2"},
    )
    assert answers["majority"] == "0.5" and answers["best_of_n"] == "0.5"


def test_weighted_votes_shift_scores_by_one_and_unanswered_trajectories_join_no_class():
    from rstar.evaluate import _choices

    # weights score + 1: one answer at 0.9 (1.9) outweighs two at -0.2 (2 * 0.8); shifted by
    # two instead, the pair (2 * 1.8) would outweigh it (2.9)
    trajs = [T("1", 0.9, True), T("2", -0.2, False), T("2", -0.2, False)]
    assert select(trajs, top_k=3, same=exact)["topk_weighted"] is True
    # unanswered trajectories each get a class of their own, apart from every answer's class:
    # the winning class's answer is "x", never an unanswered trajectory's None
    trajs = [
        T(None, 0.1, False),
        T(None, 0.2, False),
        T("x", 0.3, True),
        T("x", 0.4, True),
        T("y", 0.5, False),
    ]
    answers, correct = _choices(trajs, 5, exact)
    assert answers == {
        "majority": "x",
        "best_of_n": "y",
        "topk_vote": "x",
        "topk_weighted": "x",
        "pass": None,
    }
    assert correct["majority"] and correct["topk_vote"] and not correct["best_of_n"]


def test_budget_held_and_grouping_by_problem():
    from rstar.evaluate import budget_held, group_by_problem

    tree = Tree.new("q", "p")
    for i, (ans, ok, v) in enumerate([("1", False, 0.2), ("2", True, 0.8), (None, False, None)]):
        node = tree.add_child(tree.root, str(i), kind="answer", terminal=ANSWER if ans else "no_answer")
        node.answer, node.correct, node.value, node.rollout, node.N = ans, ok, v, 2 - i, 1
    rec = lambda mode, pid, i, search: {  # noqa: E731
        "mode": mode,
        "search_index": i,
        "problem": {"id": pid},
        "tree": tree.to_dict(),
        "config": {"search": search},
    }
    recs = [rec("mcts", "a", i, {"rollouts": 5}) for i in range(3)] + [rec("mcts", "b", 0, {"rollouts": 4})]
    assert budget_held(recs) == 1  # problem b has one search
    assert budget_held(recs, "rollouts") == 4
    assert (
        budget_held([rec("bon", "a", 0, {"trajectories": 6}), rec("bon", "b", 0, {"trajectories": 3})]) == 3
    )
    assert budget_held([]) == 0
    grouped = group_by_problem(recs[:3] + recs[3:], unit="searches")
    assert list(grouped) == ["a", "b"] and [t.order for t in grouped["a"][1]] == [0, 1, 2]
    assert grouped["a"][0] == {"id": "a"}
    by_rollout = group_by_problem(recs[3:], unit="rollouts")["b"][1]
    assert [(t.answer, t.order) for t in by_rollout] == [(None, 0), ("2", 1), ("1", 2)]
    # a search with no answer contributes one unanswered trajectory
    empty = Tree.new("q", "p")
    [t] = trajectories({"mode": "mcts", "search_index": 4, "problem": {"id": "c"}, "tree": empty.to_dict()})
    assert (t.answer, t.score, t.correct, t.order) == (None, None, False, 4)


@pytest.mark.slow
def test_run_eval_with_rollouts_beam_and_best_of_n(tmp_path, toy_ppm):
    """`rstar eval` end to end on the scripted policy with a real (toy) PPM: MCTS counted in
    rollouts, step-level beam search and best-of-N; the summary is what the records give."""
    from rstar.config import load_config
    from rstar.data.problems import Problem
    from rstar.evaluate import EvalRun, run_eval
    from rstar.search.treefile import iter_records
    from scripted import ScriptedPolicy

    probs = [
        Problem(id=f"add:{i}", question=f"What is {10 + i} + {30 + i}?", answer=str(40 + 2 * i))
        for i in range(3)
    ]
    cfg = load_config("eval", overrides=["search.num_samples=3", "search.beam_width=2", "sandbox.workers=1"])
    ppm = str(toy_ppm[0])
    runs = [
        EvalRun("mcts-ppm", "mcts", ppm),
        EvalRun("beam-ppm", "beam", ppm),
        EvalRun("bon-ppm", "bon", ppm),
    ]
    summary = run_eval(
        probs,
        cfg,
        runs,
        [1, 2, 4],
        tmp_path,
        top_k=2,
        policy=ScriptedPolicy(),
        show_progress=False,
        mcts_unit="rollouts",
    )
    assert (
        summary["runs"]["mcts-ppm"]["unit"] == "rollouts" and summary["runs"]["bon-ppm"]["unit"] == "samples"
    )
    for name, run in summary["runs"].items():
        recs = list(iter_records(tmp_path / name / "trees.jsonl"))
        search = recs[0]["config"]["search"]
        assert search["mode"] == run["mode"]
        if name == "mcts-ppm":
            assert len(recs) == 3 and (search["rollouts"], search["trajectories"]) == (4, 1)
            assert all(a["rollout"] is not None for r in recs for a in r["tree"]["nodes"] if a["terminal"])
        else:
            assert len(recs) == (3 if name == "bon-ppm" else 12)
        assert sorted(int(k) for k in run["metrics"]) == [1, 2, 4]
        # every budget is the per-problem verdicts of results.jsonl, averaged
        rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
        rows = [r for r in rows if r["run"] == name]
        assert len(rows) == 3
        for k in ("1", "2", "4"):
            for metric in ("majority", "best_of_n", "topk_vote", "pass"):
                want = sum(r["by_budget"][k]["correct"][metric] for r in rows) / 3
                assert run["metrics"][k if k in run["metrics"] else int(k)][metric] == pytest.approx(want)
    # four rollouts reach both programs that run (one adds, one subtracts); one best answer
    # per beam search or best-of-N sample is what those report
    assert summary["runs"]["mcts-ppm"]["metrics"][4]["pass"] == 1.0


def test_trajectories_carry_score_and_verdict_and_settle_as_the_search_did():
    tree = Tree.new("q", "p")
    a = tree.add_child(tree.root, "a", kind="answer", terminal=ANSWER, answer="1", correct=False, value=0.9)
    b = tree.add_child(tree.root, "b", kind="answer", terminal=ANSWER, answer="2", correct=True, value=0.1)
    a.rollout, b.rollout, a.N, b.N, a.q, b.q = 0, 1, 1, 1, -1.0, 1.0
    for mode, unit in (("bon", "searches"), ("mcts", "rollouts")):
        got = trajectories(_record(mode, tree), unit=unit)
        assert [(t.answer, t.score, t.correct) for t in got] == [("1", 0.9, False), ("2", 0.1, True)]
    # a data-generation MCTS record (terminal-guided) settled by Q; an inference one by value
    rec = _record("mcts", tree)
    rec["config"] = {"search": {"mode": "mcts", "terminal_guided": True}}
    assert trajectories(rec)[0].answer == "2"
    rec["config"] = {"search": {"mode": "mcts", "terminal_guided": False}}
    assert trajectories(rec)[0].answer == "1"
    del rec["search_index"]
    assert trajectories(rec)[0].order == 0  # a record of one search per problem


def test_metrics_without_levels_without_problems_and_with_a_narrow_top_k():
    per_problem = {
        "a": ({"id": "a"}, [T("1", 0.9, False, 0), T("2", 0.5, True, 1), T("2", 0.4, True, 2)]),
        "b": ({"id": "b", "level": "3"}, [T("5", 0.1, True, 0)]),
    }
    m = metrics_at_budgets(per_problem, [3], top_k=1, same=exact)[3]
    assert m["n"] == 2 and m["levels"] == {"3": {**dict.fromkeys(m.keys() - {"n", "levels"}, 1.0), "n": 1}}
    assert m["topk_vote"] == 0.5 and m["majority"] == 1.0  # top-1 of a is the wrong "1"
    empty = metrics_at_budgets({}, [1, 4], top_k=2, same=exact)
    assert empty[4] == {
        "majority": 0.0,
        "best_of_n": 0.0,
        "topk_vote": 0.0,
        "topk_weighted": 0.0,
        "pass": 0.0,
        "n": 0,
        "levels": {},
    }


def test_budget_held_counts_searches_and_reads_missing_settings_as_none():
    from rstar.evaluate import budget_held

    rec = lambda mode, pid, **extra: {"mode": mode, "problem": {"id": pid}, **extra}  # noqa: E731
    assert budget_held([rec("mcts", "a"), rec("mcts", "a"), rec("mcts", "b"), rec("mcts", "b")]) == 2
    assert budget_held([rec("bon", "a"), rec("bon", "b")]) == 0  # no config: no samples known
    assert budget_held([rec("mcts", "a")], unit="rollouts") == 0
    assert budget_held([rec("mcts", "a", config={"search": {}})], unit="rollouts") == 0
