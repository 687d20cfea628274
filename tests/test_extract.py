"""`rstar extract`: SFT trajectories, PPM/ORM pairs, PQM records and coverage from tree files.

Most tests use one hand-built tree (`tree1`) whose right answers are worked out below, so a
wrong selection shows up as a concrete difference; a property test checks the invariants on
random MCTS trees grown by tests/helpers/viewer_trees.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from conftest import RSTAR_FORMAT
from helpers import viewer_trees
from rstar import RstarError
from rstar.cli import main as rstar_main
from rstar.config import Config
from rstar.data import extract as ex
from rstar.data.problems import Problem
from rstar.search.jobs import record as run_record
from rstar.search.scheduler import Job
from rstar.search.tree import ANSWER, CODE_ERROR, TRUNCATED, Node, Tree
from rstar.search.treefile import read_trees
from rstar.steps import (
    ASSISTANT_HEADER,
    FEWSHOT_INSTRUCTIONS,
    fewshot_prompt,
    ppm_prompt,
    sft_prompt,
    split_steps,
)

Q1 = "What is 6 times 7?"
HEAD = "\n" + ASSISTANT_HEADER


# ---------- building trees by hand ----------


def step(tree: Tree, parent: Node, name: str, N: int, q: float, **kw) -> Node:
    """A code step whose text names it (texts of different names are far apart)."""
    head = "<code>\n" if parent.id == 0 else "\n\n"
    tag = (name * 25)[:25]  # >= 20 characters apart from any other name's
    text = f"{head}# Step {parent.depth + 1}: the {tag} approach\n{name.lower()} = 6 * 7\n<end_of_step>"
    return tree.add_child(parent, text, kind="code", exec_ok=True, N=N, q=q, **kw)


def code_end(tree: Tree, parent: Node, name: str, N: int, q: float, out: str = "42") -> Node:
    text = f"\n\n# Now print the final answer of {(name * 25)[:25]}\nprint({name.lower()})\n<end_of_code>\n<output>{out}<end_of_output>"
    return tree.add_child(parent, text, kind="code_end", exec_ok=True, observation=out, N=N, q=q)


def answer(tree: Tree, parent: Node, name: str, ans: str, N: int, q: float) -> Node:
    text = f"\n<answer>From the result of {(name * 25)[:25]}, the answer is \\boxed{{{ans}}}.<end_of_answer>"
    return tree.add_child(
        parent, text, kind="answer", terminal=ANSWER, answer=ans, correct=ans == "42", N=N, q=q
    )


def chain(tree: Tree, name: str, ans: str, qs: tuple[float, float, float], N: int = 1) -> list[Node]:
    """step -> code_end -> answer under the root, node Qs = qs (q = Q * N)."""
    a = step(tree, tree.root, name, N, qs[0] * N)
    b = code_end(tree, a, name, N, qs[1] * N)
    c = answer(tree, b, name, ans, N, qs[2] * N)
    return [a, b, c]


def make_record(tree: Tree, pid: str = "p:1", index: int = 0, level: str | None = "Level 2") -> dict:
    """A tree-file line as `rstar generate` writes it (rstar.search.jobs.record)."""
    problem = Problem(id=pid, question=tree.question, answer="42", level=level, source="test")
    job = Job(problem=problem, index=index, seed=1000 + index)
    info = {"answer": None, "correct": None, "seconds": 0.1, "nodes": len(tree.nodes) - 1, "tokens": 0}
    return run_record(job, tree, info, Config(), {"rstar": "test"})


def tree1() -> tuple[Tree, dict[str, Node]]:
    """The main hand-built tree. Node Qs (q = Q * N):

        root
        +- A  .5  -> A1 .5 -> A1x correct 1.0, A1y wrong -1.0, A1z correct (unvisited, q=5)
        +- B  -1  -> B1 -1 -> B1x wrong -1                        (N=3)
        +- C  0   -> C1 1 -> C1x correct 1 ;  C2 code error -1    (N=2 / 1)
        +- D  -1  -> D1 truncated -1                              (N=1)
        +- E  unvisited (q=0.9, a PPM initial value)
        +- F  .2  -> F1 1 -> F1x correct 1                        (N=5)
        +- G  -.5 -> G1 -.5 -> G1x wrong -1                       (N=2)
        +- H  1.0, failed code (exec_ok False) -> H1 correct answer 1.0

    Step pairs at the root: positives A (.5), F (.2) (C at 0 is third; H's correct answer is
    reached through an error, so H is neither); negatives B and D (both -1; B has more visits),
    G (-.5) is third. At C: C1 vs C2. Correct trajectories by mean Q: F .733, A .667 (min .5),
    C .667 (min 0) -> SFT [F, A]. Wrong ones by mean Q: B -1, G -.667, A1y 0.
    """
    t = Tree.new(Q1, sft_prompt(Q1))
    n: dict[str, Node] = {}
    n["A"] = step(t, t.root, "A", 4, 2.0)
    n["A1"] = code_end(t, n["A"], "A", 4, 2.0)
    n["A1x"] = answer(t, n["A1"], "A", "42", 3, 3.0)
    n["A1y"] = answer(t, n["A1"], "A-wrong", "41", 1, -1.0)
    n["A1z"] = answer(t, n["A1"], "A-unvisited", "42", 0, 5.0)
    n["B"], n["B1"], n["B1x"] = chain(t, "B", "40", (-1, -1, -1), N=3)
    n["C"] = step(t, t.root, "C", 2, 0.0)
    n["C1"] = code_end(t, n["C"], "C", 1, 1.0)
    n["C1x"] = answer(t, n["C1"], "C", "42", 1, 1.0)
    n["C2"] = t.add_child(
        n["C"],
        "\n\n# Step 2: divide by the count\ny = total / count\n<end_of_step>",
        kind="code",
        exec_ok=False,
        error_streak=1,
        observation="NameError: name 'total' is not defined",
        terminal=CODE_ERROR,
        N=1,
        q=-1.0,
    )
    n["D"] = step(t, t.root, "D", 1, -1.0)
    n["D1"] = t.add_child(
        n["D"], "\n\n# Step 2: keep going and going" + " and on" * 20, kind="partial", terminal=TRUNCATED
    )
    n["D1"].N, n["D1"].q = 1, -1.0
    n["E"] = step(t, t.root, "E", 0, 0.9)
    n["F"], n["F1"], n["F1x"] = chain(t, "F", "42", (0.2, 1.0, 1.0), N=5)
    n["G"], n["G1"], n["G1x"] = chain(t, "G", "43", (-0.5, -0.5, -1.0), N=2)
    n["H"] = step(t, t.root, "H", 2, 2.0)
    n["H"].exec_ok, n["H"].error_streak, n["H"].observation = False, 1, "NameError: name 'h' is not defined"
    n["H1"] = answer(t, n["H"], "H", "42", 2, 2.0)
    for node in t.nodes:
        node.expanded = bool(node.children)
    return t, n


def text(t: Tree, node: Node) -> str:
    return "".join(t.steps(node))


def whole_pair(t: Tree, pos: Node, neg: Node, pc: int = 2, nc: int = 2) -> dict:
    return {
        "prompt": ppm_prompt(t.question),
        "neg": HEAD + text(t, neg),
        "pos": HEAD + text(t, pos),
        "neg_count": nc,
        "pos_count": pc,
    }


def step_pair(t: Tree, pos: Node, neg: Node, pc: int, nc: int) -> dict:
    if pos.depth == 1:
        prompt, p, n = ppm_prompt(t.question), HEAD + pos.text, HEAD + neg.text
    else:
        prompt, p, n = t.prefix(t.nodes[pos.parent]), pos.text, neg.text
    return {"prompt": prompt, "neg": n, "pos": p, "neg_count": nc, "pos_count": pc}


# ---------- SFT ----------


def test_sft_top2_by_mean_q_ties_by_min_q_errors_and_unvisited_dropped():
    t, n = tree1()
    stats = ex.ExtractStats()
    out = ex.extract_sft([make_record(t)], stats=stats)
    # H1 (mean 1.0, through a failed step) and A1z (unvisited) would win on Q: both are left out.
    assert out == [
        {"query": Q1, "response": text(t, n["F1x"])},
        {"query": Q1, "response": text(t, n["A1x"])},  # A beats C on min Q at equal mean
    ]
    assert stats.correct_with_errors == 1
    assert ex.extract_sft([make_record(t)], top_k=3)[2]["response"] == text(t, n["C1x"])


def test_sft_round_trip_splits_into_the_tree_steps():
    t, n = tree1()
    for rec in ex.extract_sft([make_record(t)], top_k=5):
        steps = split_steps(rec["response"])
        assert "".join(steps) == rec["response"]
        assert rec["response"].startswith("<code>")
        # the same steps the tree holds, byte for byte
        leaf = next(x for x in t.nodes if x.terminal and text(t, x) == rec["response"])
        assert steps == t.steps(leaf)


def test_sft_pools_searches_of_a_problem_and_dedupes_texts():
    t, n = tree1()
    t2 = Tree.new(Q1, sft_prompt(Q1))
    k = chain(t2, "K", "42", (0.9, 0.9, 0.9), N=2)
    chain(t2, "F", "42", (0.9, 0.9, 0.8), N=2)  # the same response as tree1's F path
    other = Tree.new("Another question?", sft_prompt("Another question?"))
    chain(other, "Z", "42", (0.1, 0.1, 0.1))
    recs = [make_record(t, index=0), make_record(other, pid="p:2"), make_record(t2, index=1)]
    out = ex.extract_sft(recs)
    assert [r["response"] for r in out] == [text(t2, k[2]), text(t, n["F1x"]), text(other, other.nodes[3])]
    assert [r["query"] for r in out] == [Q1, Q1, "Another question?"]


def test_repeated_search_counted_once():
    t, _ = tree1()
    rec = make_record(t)
    stats = ex.ExtractStats()
    assert ex.extract_sft([rec, copy.deepcopy(rec)], stats=stats) == ex.extract_sft([rec])
    assert (stats.trees, stats.duplicates) == (1, 1)


# ---------- PPM ----------


def test_ppm_step_pairs_and_whole_pairs_of_tree1():
    t, n = tree1()
    stats = ex.ExtractStats()
    out = ex.extract_ppm([make_record(t)], stats=stats)
    expected_steps = [step_pair(t, n[p], n[q], 2, 2) for p in ("A", "F") for q in ("B", "D")] + [
        step_pair(t, n["C1"], n["C2"], 1, 1)
    ]
    expected_whole = [whole_pair(t, n[p], n[q]) for p in ("F1x", "A1x") for q in ("B1x", "G1x")]
    assert out == expected_steps + expected_whole
    assert (stats.step_pairs, stats.whole_pairs, stats.filtered_margin, stats.filtered_edit_distance) == (
        5,
        4,
        0,
        0,
    )


def test_ppm_pairs_share_the_prefix_and_prompt_plus_pos_is_the_prefix_text():
    t, _ = tree1()
    prefixes = {t.prefix(x) for x in t.nodes}
    full = {sft_prompt(Q1) + text(t, x) for x in t.nodes if x.terminal}
    for r in ex.extract_ppm([make_record(t)]):
        assert r["prompt"] + r["pos"] in prefixes
        assert r["prompt"] + r["neg"] in prefixes
        if r["prompt"] == ppm_prompt(Q1):
            assert r["pos"].startswith(HEAD + "<code>") and r["neg"].startswith(HEAD + "<code>")
        else:
            assert r["prompt"].startswith(sft_prompt(Q1) + "<code>")
        if r["pos"].endswith("<end_of_answer>"):  # a whole-trajectory pair
            assert r["prompt"] + r["pos"] in full


def test_no_step_pairs_for_answer_children():
    """A code_end node with a correct and a wrong answer child gives no step pair: the
    whole-trajectory pairs stand for the final step."""
    t, n = tree1()
    answers = {n[k].text for k in ("A1x", "A1y", "A1z", "C1x", "F1x", "G1x", "B1x", "H1")}
    for r in ex.extract_ppm([make_record(t)], min_margin=0, min_edit_distance=0):
        assert r["pos"] not in answers and r["neg"] not in answers


def test_invalid_negatives_option():
    t, n = tree1()
    out = ex.extract_ppm([make_record(t)], invalid_negatives=True)
    whole = [r for r in out if r["pos"].endswith("<end_of_answer>")]
    # B path and D path (truncated) tie at mean -1 and min -1: B comes first (earlier node)
    assert whole == [whole_pair(t, n[p], n[q]) for p in ("F1x", "A1x") for q in ("B1x", "D1")]


def second_tree() -> tuple[Tree, dict[str, Node]]:
    """Same problem, another search: K (.9) is the only positive at the root; L (.5) is a
    negative within the margin of K; M differs from K by two characters."""
    t = Tree.new(Q1, sft_prompt(Q1))
    n: dict[str, Node] = {}
    n["K"], _, n["K1x"] = chain(t, "K", "42", (0.9, 0.9, 0.9), N=2)
    n["L"], _, n["L1x"] = chain(t, "L", "44", (0.5, 0.5, 0.5), N=2)
    m = step(t, t.root, "M", 2, -2.0)  # Q -1 all along the path
    m.text = n["K"].text.replace("6 * 7", "6 * 8")
    n["M"] = m
    n["M1"] = code_end(t, m, "M", 2, -2.0, out="48")
    n["M1x"] = answer(t, n["M1"], "M", "48", 2, -2.0)
    return t, n


def test_margin_and_edit_distance_filters():
    t, n = second_tree()
    rec = make_record(t, index=1)
    off = ex.extract_ppm([rec], min_margin=0, min_edit_distance=0)
    steps = [r for r in off if not r["pos"].endswith("<end_of_answer>")]
    assert steps == [step_pair(t, n["K"], n["M"], 1, 2), step_pair(t, n["K"], n["L"], 1, 2)]
    stats = ex.ExtractStats()
    on = ex.extract_ppm([rec], stats=stats)  # the authors' 0.5 and 20
    assert [r for r in on if not r["pos"].endswith("<end_of_answer>")] == []
    # whole pairs: K vs M (mean -1) passes, K vs L (margin .4) is dropped
    assert [r for r in on if r["pos"].endswith("<end_of_answer>")] == [
        whole_pair(t, n["K1x"], n["M1x"], 1, 2)
    ]
    assert (stats.filtered_margin, stats.filtered_edit_distance) == (2, 1)
    only_edit = ex.ExtractStats()
    ex.extract_ppm([rec], min_margin=0, stats=only_edit)
    assert (only_edit.filtered_margin, only_edit.filtered_edit_distance) == (0, 1)


def test_ppm_pools_whole_pairs_but_keeps_step_pairs_per_tree():
    t, n = tree1()
    t2, n2 = second_tree()
    out = ex.extract_ppm(
        [make_record(t2, index=1), make_record(t, index=0)], min_margin=0, min_edit_distance=0
    )
    first = ex.extract_ppm([make_record(t)], min_margin=0, min_edit_distance=0)
    second = ex.extract_ppm([make_record(t2, index=1)], min_margin=0, min_edit_distance=0)

    def steps(rs: list[dict]) -> list[dict]:
        return [r for r in rs if not r["pos"].endswith("<end_of_answer>")]

    # step pairs: tree by tree in search_index order, never across trees
    assert steps(out) == steps(first) + steps(second)
    # whole pairs over both searches: K (.9) and F (.733) vs B and M (both mean -1 and min -1:
    # the tie goes to the earlier search, B's)
    k, m = HEAD + text(t2, n2["K1x"]), HEAD + text(t2, n2["M1x"])
    assert [r for r in out if r["pos"].endswith("<end_of_answer>")] == [
        {**whole_pair(t, n["F1x"], n["B1x"]), "pos": k},
        {**whole_pair(t, n["F1x"], n["B1x"]), "pos": k, "neg": m},
        whole_pair(t, n["F1x"], n["B1x"]),
        {**whole_pair(t, n["F1x"], n["B1x"]), "neg": m},
    ]


def test_q_only_from_visited_children():
    t = Tree.new(Q1, sft_prompt(Q1))
    good = chain(t, "A", "42", (0.5, 0.5, 0.5))
    bad = chain(t, "B", "41", (-1, -1, -1))
    unvisited = chain(t, "C", "40", (-0.9, -0.9, -0.9), N=1)
    for x in unvisited:
        x.N = 0  # PPM-initialised q, never visited
    out = ex.extract_ppm([make_record(t)], min_margin=0, min_edit_distance=0)
    assert out[0] == step_pair(t, good[0], bad[0], 1, 1)
    assert all(unvisited[0].text not in r["neg"] for r in out)


def test_prompts_are_rebuilt_from_the_question_not_copied_from_a_fewshot_tree():
    """Round-1 trees are searched with a few-shot prompt; their data trains a model that sees
    the SFT prompt, so pairs and PQM records must not carry the few-shot example."""
    t, n = tree1()
    t.prompt = fewshot_prompt(Q1)
    for r in ex.extract_ppm([make_record(t)]) + ex.extract_pqm([make_record(t)]):
        assert r["prompt"] == ppm_prompt(Q1) or r["prompt"].startswith(sft_prompt(Q1) + "<code>")
    assert step_pair(t, n["C1"], n["C2"], 1, 1)["prompt"].startswith(FEWSHOT_INSTRUCTIONS)


# ---------- ORM and PQM ----------


def test_orm_outcome_pairs_without_q():
    t, n = tree1()
    out = ex.extract_orm([make_record(t)], top_k=10, min_edit_distance=0)
    correct = {HEAD + text(t, n[k]) for k in ("A1x", "A1z", "C1x", "F1x")}  # A1z: no visits needed
    wrong = {HEAD + text(t, n[k]) for k in ("A1y", "B1x", "G1x")}
    assert {r["pos"] for r in out} == correct  # H1 (through an error) is not a positive
    assert {r["neg"] for r in out} == wrong
    assert len(out) == 12 and all(r["pos_count"] == 4 and r["neg_count"] == 3 for r in out)
    assert all(r["prompt"] == ppm_prompt(Q1) for r in out)
    # top 2 of each side: a choice that does not depend on Q or record order, and moves with the seed
    two = ex.extract_orm([make_record(t)])
    assert len(two) == 4 and {r["pos"] for r in two} <= correct and {r["neg"] for r in two} <= wrong
    t_flipped, _ = tree1()
    for x in t_flipped.nodes:
        x.q = -x.q
    assert ex.extract_orm([make_record(t_flipped)]) == two
    seeds = {json.dumps(ex.extract_orm([make_record(t)], seed=s)) for s in range(6)}
    assert len(seeds) > 1


def test_an_answer_step_cut_at_another_stop_string_is_no_positive():
    """Seen in an `embedded-full` round 4: the answer step ran on into code and stopped at
    `<end_of_step>`. The search grades its box as correct, but it is not a finished solution:
    not an SFT target, not a pair's positive (the ORM's trainer refuses it)."""
    from rstar.training.reward import _whole_solution

    t, n = tree1()
    cut = t.add_child(
        n["F1"],
        "\n<answer>From the result, the answer is \\boxed{42}_total = f - 8\n<end_of_step>",
        kind="answer",
        terminal=ANSWER,
        answer="42",
        correct=True,
        N=5,
        q=5.0,
    )
    stats = ex.ExtractStats()
    sft = ex.extract_sft([make_record(t)], top_k=10, stats=stats)
    assert {r["response"] for r in sft} == {text(t, n[k]) for k in ("F1x", "A1x", "C1x")}
    assert stats.unfinished_answers == 1
    orm = ex.extract_orm([make_record(t)], top_k=10, min_edit_distance=0)
    assert {r["pos"] for r in orm} == {HEAD + text(t, n[k]) for k in ("A1x", "A1z", "C1x", "F1x")}
    assert all(_whole_solution(r) is None for r in orm)
    ppm = ex.extract_ppm([make_record(t)], top_k=10, min_margin=0, min_edit_distance=0)
    assert HEAD + text(t, cut) not in {r["pos"] for r in ppm}
    assert any(r["pos"] == HEAD + text(t, n["F1x"]) for r in ppm)  # the finished one still is


def test_pqm_records_every_visited_node_split_like_pairs():
    t, n = tree1()
    out = ex.extract_pqm([make_record(t)])
    visited = [x for x in t.nodes[1:] if x.N > 0]
    assert len(out) == len(visited)
    by_step = {(r["prompt"], r["step"]): r["q"] for r in out}
    assert by_step[(ppm_prompt(Q1), HEAD + n["A"].text)] == 0.5
    assert by_step[(t.prefix(n["C"]), n["C2"].text)] == -1.0
    assert by_step[(t.prefix(n["A1"]), n["A1y"].text)] == -1.0
    assert all(set(r) == {"prompt", "step", "q"} for r in out)
    assert {r["prompt"] + r["step"] for r in out} == {t.prefix(x) for x in visited}


# ---------- coverage ----------


def test_coverage_overall_and_per_level():
    t, _ = tree1()
    wrong = Tree.new("Q2?", sft_prompt("Q2?"))
    chain(wrong, "W", "41", (-1, -1, -1))
    unvisited_right = Tree.new("Q3?", sft_prompt("Q3?"))
    chain(unvisited_right, "R", "42", (0, 0, 0), N=0)
    recs = [
        make_record(t, pid="p:1", level="Level 1"),
        make_record(wrong, pid="p:2", level="Level 5"),
        make_record(wrong, pid="p:2", index=1, level="Level 5"),
        make_record(unvisited_right, pid="p:3", level="Level 5"),
        make_record(wrong, pid="p:4", level=None),
    ]
    cov = ex.coverage(recs)
    assert cov["problems"] == 4 and cov["covered"] == 2 and cov["coverage"] == 0.5
    assert cov["by_level"] == {
        "Level 1": {"problems": 1, "covered": 1, "coverage": 1.0},
        "Level 5": {"problems": 2, "covered": 1, "coverage": 0.5},
        "none": {"problems": 1, "covered": 0, "coverage": 0.0},
    }


# ---------- invariants on random MCTS trees ----------


def test_invariants_on_random_mcts_trees():
    recs = [
        viewer_trees.record(f"r:{i}", viewer_trees.grow(150, seed=10 + i, branching=4, max_depth=10), seed=i)
        for i in range(6)
    ]
    trees = {r["key"]: Tree.from_dict(r["tree"]) for r in recs}
    prefixes: dict[str, Node] = {}
    for t in trees.values():
        for x in t.nodes:
            prefixes[t.prefix(x)] = (t, x)
    pairs = ex.extract_ppm(recs, min_margin=0, min_edit_distance=0)
    assert pairs
    for r in pairs:
        t, pos = prefixes[r["prompt"] + r["pos"]]
        _, neg = prefixes[r["prompt"] + r["neg"]]
        if pos.terminal == ANSWER:  # whole-trajectory pair
            assert r["prompt"] == ppm_prompt(t.question) and pos.correct and neg.correct is False
            continue
        assert pos.parent == neg.parent and pos.N > 0 and neg.N > 0 and pos.Q >= neg.Q
        assert 1 <= r["pos_count"] <= 2 and 1 <= r["neg_count"] <= 2
        below = [x for x in t.nodes if x.is_terminal and any(y is pos for y in t.path(x))]
        assert any(x.correct for x in below)
        below = [x for x in t.nodes if x.is_terminal and any(y is neg for y in t.path(x))]
        assert below and not any(x.correct for x in below)
    for r in ex.extract_sft(recs):
        assert "".join(split_steps(r["response"])) == r["response"]
        t, leaf = prefixes[sft_prompt(r["query"]) + r["response"]]
        assert leaf.correct and split_steps(r["response"]) == t.steps(leaf)
    assert len(ex.extract_pqm(recs)) == sum(1 for t in trees.values() for x in t.nodes[1:] if x.N > 0)


# ---------- formats ----------


def test_formats_match_the_authors_files():
    authors_sft = json.loads((RSTAR_FORMAT / "sft_data_examples.json").read_text())
    authors_ppm = json.loads((RSTAR_FORMAT / "ppm_pair_examples.json").read_text())
    t, _ = tree1()
    sft = ex.extract_sft([make_record(t)])
    ppm = ex.extract_ppm([make_record(t)])
    assert all(list(r) == list(authors_sft[0]) for r in sft)
    assert all(list(r) == list(authors_ppm[0]) for r in ppm)
    for a in authors_sft:  # responses start at <code>, the prompt is the SFT prompt
        assert a["response"].startswith("<code>") and split_steps(a["response"])[0].startswith("<code>")
    for mine, theirs in ((ppm, authors_ppm),):
        first_step = lambda r: r["prompt"].startswith("<|user|>:\n") and "<|assistant|>" not in r["prompt"]  # noqa: E731
        for r in [*mine, *theirs]:
            if first_step(r):
                assert r["pos"].startswith(HEAD + "<code>") and r["neg"].startswith(HEAD + "<code>")
            else:
                assert "\n" + ASSISTANT_HEADER + "<code>" in r["prompt"]
                assert not r["pos"].startswith("\n<|assistant|>")
        assert any(first_step(r) for r in theirs) and any(not first_step(r) for r in theirs)
    # their pairs read as ours: the prompt of a deeper pair is an SFT prompt plus whole steps
    for r in authors_ppm:
        if "<|assistant|>" in r["prompt"]:
            question = r["prompt"][len("<|user|>:\n") : r["prompt"].index("\n" + ASSISTANT_HEADER)]
            rest = r["prompt"][len(sft_prompt(question)) :]
            assert "".join(split_steps(rest)) == rest and rest.endswith("<end_of_step>")


# ---------- files and the CLI ----------


def write_lines(path: Path, recs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_cli_writes_jsonl_and_json_and_prints_a_summary(tmp_path, capsys):
    t, _ = tree1()
    t2, _ = second_tree()
    run = tmp_path / "run"
    write_lines(run / "trees.jsonl", [make_record(t)])
    other = write_lines(tmp_path / "more.jsonl", [make_record(t2, index=1)])
    with open(other, "a") as f:
        f.write('{"key": "p:1#2", "tree": {"no')  # a kill's partial last line: skipped
    assert (
        rstar_main(
            [
                "extract",
                "ppm",
                str(run),
                str(run / "trees.jsonl"),
                str(other),
                "--out",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == ex.extract_ppm([make_record(t), make_record(t2, index=1)])
    msg = capsys.readouterr().out
    assert "read 2 tree(s) of 1 problem(s) from 2 file(s)" in msg
    assert "coverage: 1/1 (100.0%)" in msg
    assert f"wrote {len(lines)} PPM pairs" in msg
    assert "pairs filtered: 1 with Q margin < 0.5, 1 with edit distance < 20" in msg

    assert rstar_main(["extract", "sft", str(run), "--out", str(tmp_path / "sft.json")]) == 0
    data = json.loads((tmp_path / "sft.json").read_text())
    assert isinstance(data, list) and data == ex.extract_sft([make_record(t)])
    assert "correct trajectories left out for a failed step: 1" in capsys.readouterr().out

    for what in ("orm", "pqm"):
        assert rstar_main(["extract", what, str(run), "--out", str(tmp_path / f"{what}.jsonl")]) == 0
    assert len((tmp_path / "pqm.jsonl").read_text().splitlines()) == len(ex.extract_pqm([make_record(t)]))
    capsys.readouterr()
    assert rstar_main(["extract", "coverage", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_level"] == {
        "Level 2": {"problems": 1, "covered": 1, "coverage": 1.0}
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"key": "a#0"}\n', "trees.jsonl:1: not a tree record: missing field 'problem'"),
        ("\n[1, 2]\n", "trees.jsonl:2: not a tree record (no 'key' field)"),
        ("not json\n", "trees.jsonl:1: not a JSON record"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "trees.jsonl"
    path.write_text(content)
    with pytest.raises(RstarError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ex.extract_sft(read_trees([path]))


def test_missing_node_field_names_file_line_and_node(tmp_path, capsys):
    t, _ = tree1()
    rec = make_record(t)
    del rec["tree"]["nodes"][3]["N"]
    path = write_lines(tmp_path / "t.jsonl", [make_record(t), rec])
    with pytest.raises(RstarError, match=r"t.jsonl:2: not a tree record: missing field 'tree.nodes\[3\].N'"):
        ex.extract_ppm(read_trees([path]))
    assert rstar_main(["extract", "sft", str(path), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "t.jsonl:2" in capsys.readouterr().err
    assert rstar_main(["extract", "sft", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_trl_format_writes_prompt_chosen_rejected(tmp_path):
    t, _ = tree1()
    run = tmp_path / "run"
    write_lines(run / "trees.jsonl", [make_record(t)])
    authors = ex.extract_ppm([make_record(t)])
    assert authors
    for what, expected in (("ppm", authors), ("orm", None)):
        out = tmp_path / f"{what}_trl.jsonl"
        assert rstar_main(["extract", what, str(run), "--format", "trl", "--out", str(out)]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert rows and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
        if expected is not None:  # the same pairs, renamed: prompt + chosen is the text the PPM scores
            assert [(r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]) for r in rows] == [
                (p["prompt"] + p["pos"], p["prompt"] + p["neg"]) for p in expected
            ]


# --- the record checks, one at a time (issue 22) -----------------------------------------------


def _broken(edit) -> dict:
    rec = make_record(tree1()[0])
    edit(rec)
    return rec


def _set(path: str, value):
    """An edit that sets rec[...] along `path` ("tree.nodes.3.id") to `value`."""

    def edit(rec):
        *head, last = path.split(".")
        d = rec
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value

    return edit


def _del(path: str):
    def edit(rec):
        *head, last = path.split(".")
        d = rec
        for k in head:
            d = d[int(k)] if isinstance(d, list) else d[k]
        del d[int(last) if isinstance(d, list) else last]

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_del("key"), "record 0: not a tree record: missing field 'key'"),
        (_del("problem.id"), "record 0: not a tree record: missing field 'problem.id'"),
        (_set("problem", "p:1"), "record 0: not a tree record: missing field 'problem.id'"),
        (_del("tree"), "record 0: not a tree record: missing field 'tree'"),
        (_del("tree.question"), "record 0: not a tree record: missing field 'tree.question'"),
        (_del("tree.nodes"), "record 0: not a tree record: missing field 'tree.nodes'"),
        (_set("tree.nodes", []), "record 0: tree.nodes is not a non-empty list"),
        (_set("tree.nodes", {"0": {}}), "record 0: tree.nodes is not a non-empty list"),
        (_set("tree.nodes.2", "a node"), r"missing field 'tree.nodes\[2\].id'"),
        (_set("tree.nodes.2.N", "many"), r"record 0: tree.nodes\[2\]: bad node"),
        (_set("tree.nodes.2.q", [1]), r"record 0: tree.nodes\[2\]: bad node"),
        (_set("tree.nodes.2.surprise", 1), None),  # unknown fields are ignored
        (_set("tree.nodes.3.id", 4), r"record 0: tree.nodes\[3\] has id 4 \(ids are positions\)"),
        (_set("tree.nodes.3.text", 7), r"record 0: tree.nodes\[3\]: text must be a string, children a list"),
        (_set("tree.nodes.3.children", 5), r"record 0: tree.nodes\[3\]: text must be a string"),
        (_set("tree.nodes.0.children", [1, 99]), r"record 0: tree.nodes\[0\]: child 99 is not a node of it"),
        (_set("tree.nodes.0.children", [0]), r"record 0: tree.nodes\[0\]: child 0 is not a node of it"),
        (_set("tree.nodes.0.children", ["1"]), r"record 0: tree.nodes\[0\]: child '1' is not a node of it"),
        (_set("search_index", "0"), "record 0: search_index must be an integer"),
    ],
)
def test_each_structural_check_names_the_record_and_the_field(edit, message):
    rec = _broken(edit)
    if message is None:
        assert ex.extract_sft([rec]) == ex.extract_sft([make_record(tree1()[0])])
        return
    for extract in (ex.extract_sft, ex.extract_ppm, ex.extract_orm, ex.extract_pqm, ex.coverage):
        with pytest.raises(RstarError, match=message):
            extract([rec])


def test_a_child_claimed_by_a_node_that_is_not_its_parent_is_refused():
    t, _ = tree1()
    rec = make_record(t)
    a, b = rec["tree"]["nodes"][0]["children"][:2]
    rec["tree"]["nodes"][a]["children"].append(rec["tree"]["nodes"][b]["children"][0])
    with pytest.raises(RstarError, match=rf"record 0: tree.nodes\[{a}\]: child \d+ is not a node of it"):
        ex.extract_ppm([rec])


def test_a_record_parsed_keeps_what_extraction_needs():
    t, _ = tree1()
    rec = make_record(t, pid="p:9", index=3, level="Level 5")
    s = ex.parse_search("f.jsonl:7", rec)
    assert (s.origin, s.key, s.problem_id, s.level, s.index, s.seed) == (
        "f.jsonl:7",
        rec["key"],
        "p:9",
        "Level 5",
        3,
        1003,
    )
    assert s.question == t.question and s.tree.to_dict() == t.to_dict()
    del rec["search_index"]
    assert ex.parse_search("x", rec).index == 0  # older records: one search per problem
    del rec["tree"]["prompt"]
    assert ex.parse_search("x", rec).tree.prompt == ""
    # a child id one past the last node is refused like any other stranger
    n = len(rec["tree"]["nodes"])
    rec["tree"]["nodes"][0]["children"].append(n)
    with pytest.raises(RstarError, match=rf"^x: tree.nodes\[0\]: child {n} is not a node of it$"):
        ex.parse_search("x", rec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 0}, "top_k must be at least 1 (got 0)"),
        ({"min_margin": -0.1}, "the filters' thresholds must be >= 0"),
        ({"min_margin": float("nan")}, "the filters' thresholds must be >= 0"),
        ({"min_edit_distance": -1}, "the filters' thresholds must be >= 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_record_is_read(kwargs, message):
    def records():
        raise AssertionError("read")
        yield

    with pytest.raises(RstarError, match="^" + re.escape(message) + "$"):
        ex.extract_ppm(records(), **kwargs)
    assert ex.extract_ppm([make_record(tree1()[0])], top_k=1, min_margin=0.0, min_edit_distance=0)


def test_solved_ids_coverage_order_and_an_empty_run():
    t, _ = tree1()
    wrong = Tree.new("Q2?", sft_prompt("Q2?"))
    chain(wrong, "W", "41", (-1, -1, -1))
    recs = [
        make_record(t, pid="p:1", level="Level 10"),
        make_record(wrong, pid="p:2", level="Level 2"),
        make_record(t, pid="p:3", level="Level 2"),
    ]
    assert ex.solved_ids(recs) == {"p:1", "p:3"}
    assert ex.solved_ids([make_record(wrong, pid="p:2")]) == set()
    cov = ex.coverage(recs)
    assert list(cov["by_level"]) == ["Level 2", "Level 10"]  # natural order, not "Level 10" first
    assert cov["by_level"]["Level 2"] == {"problems": 2, "covered": 1, "coverage": 0.5}
    assert ex.coverage([]) == {"problems": 0, "covered": 0, "coverage": 0.0, "by_level": {}}


def test_coverage_by_steps_counts_code_steps_of_the_reference():
    def ref(n_code: int) -> str:
        body = "".join(f"\n\n# step {i}\nx = {i}\n<end_of_step>" for i in range(n_code))
        return "<code>" + body[2:] + "\n\n# Now print the final answer\nprint(x)\n<end_of_code>"

    probs = [
        Problem(id="a", question="q", answer="1", meta={"solution": ref(1)}),
        Problem(id="b", question="q", answer="1", meta={"solution": ref(3)}),
        Problem(id="c", question="q", answer="1", meta={"solution": ref(3)}),
        Problem(id="d", question="q", answer="1", meta={"solution": ref(3)}),
        Problem(id="e", question="q", answer="1", meta={"solution": "no steps at all"}),
        Problem(id="f", question="q", answer="1", meta={"solution": None}),
        Problem(id="g", question="q", answer="1"),
    ]
    assert ex.coverage_by_steps(probs, {"b", "d", "e", "f"}) == {
        "1": {"problems": 1, "covered": 0, "coverage": 0.0},
        "3": {"problems": 3, "covered": 2, "coverage": 2 / 3},
    }
    assert list(ex.coverage_by_steps(probs[::-1], set())) == ["1", "3"]


def test_write_records_jsonl_json_and_stdout(tmp_path, capsys):
    recs = [{"query": "π ≈ 3.14?", "response": "yes"}, {"query": "2", "response": "no"}]
    out = tmp_path / "new" / "dir" / "sft.jsonl"
    ex.write_records(recs, out)
    text = out.read_text(encoding="utf-8")
    assert text == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) and "π" in text
    ex.write_records(recs, tmp_path / "sft.json")
    assert (tmp_path / "sft.json").read_text(encoding="utf-8") == json.dumps(
        recs, ensure_ascii=False, indent=4
    ) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "sft.json"]  # no temporary left
    ex.write_records(recs, "-")
    assert capsys.readouterr().out == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


# --- what make mutate's rerun found uncovered (issue 22) --------------------------------------


def test_an_error_streak_is_an_error_without_exec_ok():
    # an older record without exec_ok: the streak alone marks the failed step
    assert ex.is_error(Node(id=1, parent=0, depth=1, text="x", kind="code", error_streak=1))
    assert not ex.is_error(Node(id=1, parent=0, depth=1, text="x", kind="code", exec_ok=True))


def test_a_subtree_summary_is_over_every_child_not_the_last():
    t = Tree.new(Q1, sft_prompt(Q1))
    a = step(t, t.root, "A", 3, 3.0)
    b = code_end(t, a, "A", 3, 3.0)
    answer(t, b, "A", "42", 1, 1.0)  # correct, no error on its path
    answer(t, b, "U", "42", 1, 1.0).correct = None  # ungraded
    step(t, b, "Z", 1, 0.0)  # the last child: open, nothing below it
    _, _, sub = ex._analyse(t)
    s = sub[b.id]
    assert (s.has_terminal, s.correct_clean, s.correct_any, s.ungraded) == (True, True, True, True)


def test_scored_paths_name_their_terminal_search_and_node():
    t, n = tree1()
    paths = ex.scored_paths(ex.parse_search("r", make_record(t, index=3)))  # invalid ones too
    assert {p.node_id: p.terminal for p in paths} == {x.id: x.terminal for x in t.nodes if x.is_terminal}
    assert {p.index for p in paths} == {3} and n["D1"].id in {p.node_id for p in paths}


def test_best_keeps_each_text_at_its_best_rank():
    def path(text, q, node_id):
        return ex.ScoredPath(text, True, ANSWER, q, q, True, True, 0, node_id)

    best = ex._Best(2, ex._high_q)
    for p in (path("a", 0.9, 1), path("b", 0.5, 2), path("a", 0.1, 3), path("c", 0.3, 4)):
        best.add(p)
    assert [(p.text, p.node_id) for p in best.best()] == [("a", 1), ("b", 2)]


def test_filters_at_their_thresholds_and_their_counts():
    stats = ex.ExtractStats()
    margin = ex._Filter(0.5, 0, stats)
    assert margin.keep("a", "b", 0.5) and not margin.keep("a", "b", 0.49)  # at the threshold: kept
    assert ex._Filter(0.0, 0, stats).keep("a", "b", -0.5)  # 0 = off, even for a negative margin
    distance = ex._Filter(0.0, 1, stats)
    assert distance.keep("abc", "abd", None)  # one character apart: kept at 1
    assert not distance.keep("abc", "abc", None) and not distance.keep("x", "x", None)
    assert (stats.filtered_margin, stats.filtered_edit_distance) == (1, 2)


def test_the_edit_distance_filter_names_its_missing_dependency(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)  # import fails
    with pytest.raises(
        RstarError,
        match=r"^the edit-distance filter needs rapidfuzz \(pip install rapidfuzz\), "
        r"or pass --min-edit-distance 0$",
    ):
        ex._Filter(0.0, 20, ex.ExtractStats())


def test_step_positives_tie_on_q_go_to_more_visits():
    t = Tree.new(Q1, sft_prompt(Q1))
    chain(t, "P", "42", (1.0, 1.0, 1.0), N=1)
    many = chain(t, "M", "42", (1.0, 1.0, 1.0), N=3)
    chain(t, "B", "40", (-1.0, -1.0, -1.0), N=2)
    pairs = ex.extract_ppm([make_record(t)], top_k=1, min_margin=0, min_edit_distance=0)
    assert pairs[0]["pos"] == ex.split_step(Q1, t, many[0])[1]  # the first step pair, at the root
    assert ex.whole(Q1, "r") == (ppm_prompt(Q1), ex._FIRST_STEP_HEAD + "r")


def test_problems_in_natural_order_with_repeats_reruns_coverage_and_counts():
    t, _ = tree1()
    other = Tree.new("What is 2 + 2?", sft_prompt("What is 2 + 2?"))
    chain(other, "K", "42", (1.0, 1.0, 1.0))
    wrong = Tree.new(Q1, sft_prompt(Q1))
    chain(wrong, "W", "41", (-1.0, -1.0, -1.0))
    rerun = make_record(other, pid="p:2")
    rerun["seed"] = 7  # the same search key with another seed: a search of its own
    recs = [
        make_record(t, pid="p:10"),
        make_record(t, pid="p:10"),  # read again: skipped
        make_record(t, pid="p:10", index=2),
        make_record(t, pid="p:10"),  # and again
        make_record(wrong, pid="p:10", index=1),  # solves nothing: p:10 stays covered
        make_record(other, pid="p:2"),
        rerun,
    ]
    stats = ex.ExtractStats()
    sft = ex.extract_sft(recs, stats=stats)
    assert [r["query"] for r in sft] == ["What is 2 + 2?", Q1, Q1]  # p:2 before p:10
    assert (stats.trees, stats.duplicates, stats.problems, stats.covered) == (5, 2, 2, 2)
    assert stats.by_level == {"Level 2": [2, 2]}
    assert (stats.records, stats.problems_with_data) == (3, 2)
    assert stats.correct_with_errors == 2  # H's correct answer behind a failed step, per search


def test_pair_counts_add_up_over_problems_and_shared_branches_pair_once():
    t, _ = tree1()
    alone = [ex.ExtractStats(), ex.ExtractStats()]
    for pid, stats in zip(("p:1", "p:2"), alone):
        ex.extract_ppm([make_record(t, pid=pid)], stats=stats)
    both = ex.ExtractStats()
    ex.extract_ppm([make_record(t, pid="p:1"), make_record(t, pid="p:2")], stats=both)
    assert alone[0].step_pairs > 0 and alone[0].whole_pairs > 0
    assert both.step_pairs == 2 * alone[0].step_pairs and both.whole_pairs == 2 * alone[0].whole_pairs
    # a rerun of a search (same key, another seed) pairs after it, whichever is read first
    rerun = make_record(second_tree()[0])
    rerun["seed"] = 7
    off = {"min_margin": 0, "min_edit_distance": 0}
    assert ex.extract_ppm([rerun, make_record(t)], **off) == ex.extract_ppm([make_record(t), rerun], **off)
    # two searches of one problem that share every branch: each pair once
    assert ex.extract_ppm([make_record(t, index=0), make_record(t, index=1)]) == ex.extract_ppm(
        [make_record(t)]
    )


def test_orm_defaults_thresholds_and_invalid_negatives():
    t, n = tree1()
    recs = [make_record(t)]
    assert ex.extract_orm(recs, top_k=1) == ex.extract_orm(recs, top_k=1, seed=0)
    assert ex.extract_orm(recs, top_k=1, seed=0) != ex.extract_orm(recs, top_k=1, seed=3)  # the seed decides
    with pytest.raises(RstarError, match=r"^the filters' thresholds must be >= 0$"):
        ex.extract_orm(recs, min_edit_distance=-1)
    cut = ex.whole(Q1, text(t, n["D1"]))[1]
    negs = {p["neg"] for p in ex.extract_orm(recs, top_k=10, min_edit_distance=0, invalid_negatives=True)}
    assert cut in negs
    negs = {p["neg"] for p in ex.extract_orm(recs, top_k=10, min_edit_distance=0)}
    assert negs and cut not in negs


def test_write_records_renames_a_hidden_temporary_beside_the_target_and_cleans_up(tmp_path, monkeypatch):
    import os

    moves, replace = [], os.replace
    monkeypatch.setattr(ex.os, "replace", lambda a, b: moves.append((Path(a), Path(b))) or replace(a, b))
    out = tmp_path / "d" / "sft.jsonl"
    ex.write_records([{"a": 1}], out)
    [(src, dst)] = moves
    assert dst == out and src.parent == out.parent and src.name.startswith(".sft.jsonl.")
    with pytest.raises(TypeError):
        ex.write_records([{"a": object()}], out)  # not JSON: the old file stays, no temporary left
    assert [p.name for p in out.parent.iterdir()] == ["sft.jsonl"] and out.read_text() == '{"a": 1}\n'


def test_summary_lines_of_each_extraction():
    import argparse

    stats = ex.ExtractStats(
        files=2,
        trees=3,
        duplicates=1,
        problems=4,
        covered=3,
        by_level={"Level 10": [1, 1], "Level 2": [3, 2]},
        records=5,
        step_pairs=3,
        whole_pairs=2,
        filtered_margin=4,
        filtered_edit_distance=6,
        correct_with_errors=1,
        problems_with_data=2,
    )
    args = argparse.Namespace(out="p.jsonl", min_margin=0.5, min_edit_distance=20)
    head = [
        "read 3 tree(s) of 4 problem(s) from 2 file(s); 1 repeated search(es) skipped",
        "coverage: 3/4 (75.0%) problems have a correct trajectory",
        "  Level 2: 2/3 (66.7%)",
        "  Level 10: 1/1 (100.0%)",
    ]
    assert ex.summary("ppm", stats, args) == head + [
        "wrote 5 PPM pairs for 2 problem(s) to p.jsonl",
        "  step pairs 3, whole-trajectory pairs 2",
        "  correct trajectories left out for a failed step: 1",
        "  pairs filtered: 4 with Q margin < 0.5, 6 with edit distance < 20",
    ]
    assert ex.summary("coverage", stats, args) == head
    args = argparse.Namespace(out="-", min_margin=0.0, min_edit_distance=0)
    assert (
        ex.summary("ppm", stats, args)[-1] == "  pairs filtered: margin filter off, edit-distance filter off"
    )
    # one level (not "none"); ORM has no margin filter
    stats = ex.ExtractStats(files=1, trees=2, problems=2, covered=1, by_level={"Level 3": [2, 1]})
    stats.correct_with_errors = 2
    assert ex.summary("orm", stats, argparse.Namespace(out="o.jsonl", min_edit_distance=20)) == [
        "read 2 tree(s) of 2 problem(s) from 1 file(s)",
        "coverage: 1/2 (50.0%) problems have a correct trajectory",
        "  Level 3: 1/2 (50.0%)",
        "wrote 0 ORM pairs for 0 problem(s) to o.jsonl",
        "  correct trajectories left out for a failed step: 2",
        "  pairs filtered: 0 with edit distance < 20",
    ]
    # "none" beside a level is listed; "none" alone is not; PQM reports no failed-step count
    stats = ex.ExtractStats(
        files=1, trees=2, problems=2, covered=1, by_level={"none": [1, 0], "Level 1": [1, 1]}
    )
    assert ex.summary("sft", stats, argparse.Namespace(out="s.json"))[2:] == [
        "  Level 1: 1/1 (100.0%)",
        "  none: 0/1 (0.0%)",
        "wrote 0 SFT trajectories for 0 problem(s) to s.json",
    ]
    assert ex.summary("sft", stats)[-1] == "wrote 0 SFT trajectories for 0 problem(s) to None"  # no args
    stats = ex.ExtractStats(problems=0, by_level={"none": [0, 0]}, correct_with_errors=3)
    assert ex.summary("pqm", stats, argparse.Namespace(out="q.jsonl")) == [
        "read 0 tree(s) of 0 problem(s) from 0 file(s)",
        "coverage: 0/0 problems have a correct trajectory",
        "wrote 0 PQM records for 0 problem(s) to q.jsonl",
    ]


def test_cli_options_reach_the_extraction_and_the_log_leaves_stdout_to_the_records(tmp_path, capsys):
    t, _ = tree1()
    run = write_lines(tmp_path / "run" / "trees.jsonl", [make_record(t)])
    argv = ["extract", "ppm", str(run), "--out", "-", "--min-margin", "0.25", "--min-edit-distance", "5"]
    assert rstar_main([*argv, "--invalid-negatives", "--format", "authors"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(x) for x in out.splitlines()] == ex.extract_ppm([make_record(t)], 2, 0.25, 5, True)
    assert "with Q margin < 0.25" in err and "with edit distance < 5" in err
    with pytest.raises(SystemExit):
        rstar_main([*argv, "--format", "yaml"])
    # files with no tree record in them are an error that names them, for every extraction
    empty, cut = tmp_path / "empty.jsonl", tmp_path / "cut.jsonl"
    empty.write_text("")
    cut.write_text('{"key": "p:1#0", "tree": {"no')
    for what in (["coverage"], ["sft", "--out", str(tmp_path / "x.jsonl")]):
        capsys.readouterr()
        assert rstar_main(["extract", what[0], str(empty), str(cut), *what[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{empty}, {cut}: no tree records in it (empty, or only a cut-off line)" in err


def test_two_rounds_searches_of_a_problem_both_count():
    """Rounds search a problem under the same key and seed with another policy: reading several
    rounds' trees at once keeps each round's search (only the same record read again is
    skipped)."""
    t, _ = tree1()
    r1, r2 = make_record(t), make_record(t)
    r1["config"] = {"model": {"policy": "models/policy_r1", "ppm": ""}}
    r2["config"] = {"model": {"policy": "models/policy_r2", "ppm": "models/ppm_r2"}}
    stats = ex.ExtractStats()
    ex.extract_ppm([r1, r2, copy.deepcopy(r2)], min_margin=0, min_edit_distance=0, stats=stats)
    assert (stats.trees, stats.duplicates) == (2, 1)
    foreign = make_record(t)
    foreign["config"] = "not a mapping"  # a record without the models: key and seed alone
    stats = ex.ExtractStats()
    ex.extract_sft([foreign, copy.deepcopy(foreign)], stats=stats)
    assert (stats.trees, stats.duplicates) == (1, 1)
