"""Search algorithms on a scripted policy whose right answer is known, with the real sandbox
and grader; the scheduler's cross-problem batching; tree-file resume."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from rstar.config import load_config
from rstar.data.problems import Problem
from rstar.search.expand import best_answer_node, derive_seed
from rstar.search.run import generate
from rstar.search.scheduler import Backends, Job, run_jobs
from rstar.search.tree import ANSWER, CODE_ERROR, NO_ANSWER, TOO_DEEP, TRUNCATED, Tree, select_child, uct
from rstar.search.treefile import iter_records
from rstar.steps import ROUND1_STOP_STRINGS, STOP_STRINGS
from scripted import (
    ANSWER_STEP,
    FIRST_STEPS,
    BranchingPolicy,
    ScriptedPolicy,
    ScriptedReward,
    TableReward,
    numbers,
)


def problems(k: int) -> list[Problem]:
    rng = random.Random(k)
    out = []
    for i in range(k):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(Problem(id=f"add:{i}", question=f"What is {a} + {b}?", answer=str(a + b), source="add"))
    return out


def search(cfg, backends, probs) -> list[tuple[Job, Tree, dict]]:
    done = []
    jobs = [Job(problem=p, seed=derive_seed(cfg.search.seed, p.id, 0)) for p in probs]

    def on_error(job, tb):
        raise AssertionError(tb)

    run_jobs(jobs, cfg, backends, lambda j, t, i: done.append((j, t, i)), on_error)
    return done


def below(tree: Tree, node) -> list:
    """`node` and every node under it."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(tree.children(n))
    return out


def check_structure(tree: Tree) -> None:
    """Links agree, depths count from the root, terminals have no children."""
    for node in tree.nodes:
        for cid in node.children:
            child = tree.nodes[cid]
            assert child.parent == node.id and child.depth == node.depth + 1
        if node.terminal is not None:
            assert not node.children


def check_tree_invariants(tree: Tree, ppm_init: bool = False) -> None:
    """What every MCTS tree satisfies: answers are backed up once each, invalid terminals hold
    -1 on themselves alone, a PPM-initialised node counts its initial value as one visit, and
    so every Q lies in [-1, 1]."""
    check_structure(tree)
    for node in tree.nodes:
        assert -1.0 <= node.Q <= 1.0, node
        if node.is_terminal and node.terminal != ANSWER:
            assert (node.q, node.N) == (-1.0, 1), node  # pruned: never visited, never backed up
            continue
        answers = [n for n in below(tree, node) if n.terminal == ANSWER]
        init = 1 if ppm_init and node.id != 0 and not node.is_terminal else 0
        assert node.N == init + len(answers), node
        start = node.value if init else 0.0
        assert node.q == pytest.approx(start + sum(a.q for a in answers)), node
        if node.terminal == ANSWER:
            assert node.N == 1  # backed up once, when it was created


def test_mcts_data_generation_prefers_the_right_step(sandbox, grader):
    cfg = load_config("round2", overrides=["search.rollouts=12", "search.num_samples=8"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader)
    [(job, tree, info)] = search(cfg, backends, problems(1))
    check_tree_invariants(tree)
    firsts = {
        ("+" if " + " in c.text and "undefined" not in c.text else "-" if " - " in c.text else "err"): c
        for c in tree.children(tree.root)
    }
    # The error step is pruned (error threshold 1 in round 2): -1 on itself, never visited.
    assert firsts["err"].terminal == CODE_ERROR and firsts["err"].exec_ok is False
    assert (firsts["err"].q, firsts["err"].N) == (-1.0, 1)
    assert firsts["+"].Q == 1.0 and firsts["-"].Q == -1.0
    # Two programs run, so two answers exist: the search stops once both are found.
    assert tree.root.N == 2 and tree.root.q == 0.0
    assert sorted(a.rollout for a in tree.answers()) == [0, 1]
    answers = tree.answers()
    assert {a.answer for a in answers if a.correct} == {job.problem.answer}
    assert all(a.terminal == ANSWER for a in answers)
    assert info["correct"] is True and info["answer"] == job.problem.answer
    # the executed output is part of the code_end step, exactly as in the authors' data
    code_end = tree.nodes[answers[0].parent]
    assert code_end.text.endswith(f"<end_of_code>\n<output>{code_end.observation}<end_of_output>")


def test_mcts_visits_concentrate_on_the_branch_that_gets_answers_right(sandbox, grader):
    # First steps: 3 that keep the sum (then 3 of 4 second steps are right) and 1 that
    # subtracts (every answer below it is wrong).
    policy = BranchingPolicy(depth=2, valid=3, wrong=1)
    cfg = load_config("round2", overrides=["search.rollouts=12", "search.num_samples=4"])
    for p in problems(3):
        [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), [p])
        check_tree_invariants(tree)
        assert tree.root.N == 12  # each rollout ended at a new answer
        firsts = tree.children(tree.root)
        wrong = [c for c in firsts if " - " in c.text]
        right = [c for c in firsts if " - " not in c.text]
        assert len(wrong) == 1 and len(right) == 3
        assert wrong[0].Q == -1.0 and all(c.Q > 0 for c in right)
        assert wrong[0].N <= 2 < min(c.N for c in right)


def test_error_threshold_two_lets_a_failed_step_continue(sandbox, grader):
    cfg = load_config(
        "round1", overrides=["search.rollouts=6", "search.num_samples=6", "search.prompt_style=sft"]
    )
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader)
    [(_, tree, _)] = search(cfg, backends, problems(1))
    err = [n for n in tree.children(tree.root) if "undefined" in n.text]
    assert err and err[0].exec_ok is False and err[0].error_streak == 1 and err[0].terminal is None
    # a failed step keeps its error; a step whose code ran (before the program's end) has none
    assert "NameError" in err[0].observation and "undefined_" in err[0].observation
    ran = [n for n in tree.nodes if n.kind == "code" and n.exec_ok]
    assert ran and all(n.observation is None for n in ran)


def test_uct_unvisited_switch_and_ppm_values():
    tree = Tree.new("q", "p")
    tree.root.expanded = True
    a = tree.add_child(tree.root, "a")
    b = tree.add_child(tree.root, "b")
    tree.root.N, a.N, a.q = 1, 1, 1.0
    assert uct(b, tree.root, 2.0, "inf") == float("inf")
    assert uct(b, tree.root, 2.0, "zero") == 0.0  # the authors' code: q = 0, no bonus
    assert select_child(tree, tree.root, 2.0, "zero", random.Random(0)) is a
    assert select_child(tree, tree.root, 2.0, "inf", random.Random(0)) is b
    # A PPM value ranks an unvisited child, whatever the switch.
    b.value = 0.3
    assert uct(b, tree.root, 2.0, "inf") == uct(b, tree.root, 2.0, "zero") == 0.3
    # A visited child: Q plus the exploration term (paper eq. 1).
    tree.root.N, a.N, a.q = 5, 2, 1.0
    assert uct(a, tree.root, 2.0, "inf") == pytest.approx(0.5 + 2.0 * math.sqrt(math.log(5) / 2))
    # Terminals are never selected; with none open, there is nothing to select.
    a.terminal, b.terminal = ANSWER, CODE_ERROR
    assert select_child(tree, tree.root, 2.0, "inf", random.Random(0)) is None


def test_ppm_initialised_q_stays_in_range(sandbox, grader):
    # Round 3 with a PPM that says 0.8 everywhere: each new node starts at q = 0.8 with one
    # visit; answers are scored by the gold answer alone (+1/-1), so Q stays in [-1, 1].
    cfg = load_config("round3", overrides=["search.rollouts=8", "search.num_samples=4"])
    reward = TableReward(default=0.8)
    policy = BranchingPolicy(depth=2, valid=2, wrong=1, failing=1)
    [(_, tree, _)] = search(
        cfg, Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward), problems(1)
    )
    assert reward.calls > 0
    check_tree_invariants(tree, ppm_init=True)
    for node in tree.nodes[1:]:
        assert node.value == 0.8
        if node.terminal == ANSWER:
            assert (node.q, node.N) == ((1.0 if node.correct else -1.0), 1)
    assert any(a.correct for a in tree.answers()) and any(not a.correct for a in tree.answers())


def test_inference_mcts_uses_reward_values(sandbox, grader):
    cfg = load_config("eval", overrides=["search.rollouts=6", "search.num_samples=8"])
    assert cfg.search.ppm_init and not cfg.search.terminal_guided
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader, reward=ScriptedReward())
    results = search(cfg, backends, problems(3))
    for job, tree, info in results:
        check_tree_invariants(tree, ppm_init=True)
        for a in tree.answers():
            assert (a.q, a.N) == (a.value, 1)  # the answer's PPM score, counted once
        best = best_answer_node(tree)
        assert best.answer == job.problem.answer and best.value == pytest.approx(0.9)
        assert info["correct"] is True


def test_failed_code_is_pruned(sandbox, grader):
    # One way to keep the sum and three failing steps at each of two code steps: 12 samples
    # cover all four, 8 rollouts. The failing steps are never selected and back nothing up;
    # the one program that runs is found by the first rollout, which ends the search.
    policy = BranchingPolicy(depth=2, valid=1, failing=3)
    cfg = load_config("round2", overrides=["search.rollouts=8", "search.num_samples=12"])
    [(_, tree, info)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    failed = [n for n in tree.nodes if n.terminal == CODE_ERROR]
    assert len(failed) == 6 and all((n.q, n.N) == (-1.0, 1) for n in failed)
    assert tree.root.N == 1 and tree.root.q == 1.0 and info["correct"] is True
    assert len(policy.calls) == 4  # root, step 1, step 2, print: no call after the tree closed
    # With three programs that run per step, each of the 8 rollouts finds a new answer.
    policy = BranchingPolicy(depth=2, valid=3, failing=3)
    cfg = load_config("round2", overrides=["search.rollouts=8", "search.num_samples=6"])
    [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    assert sorted(a.rollout for a in tree.answers()) == list(range(8))
    assert tree.root.N == 8 and tree.root.q == 8.0


def test_mcts_invariants_over_random_scripted_trees(sandbox, grader):
    """Random tree shapes, failure rates and presets: every invariant of check_tree_invariants."""
    rng = random.Random(0)
    for _ in range(12):
        preset = rng.choice(["round1", "round2", "round3", "eval"])
        policy = BranchingPolicy(
            depth=rng.randint(1, 3),
            valid=rng.randint(1, 3),
            wrong=rng.randint(0, 2),
            failing=rng.randint(1, 3),
            fail_p=rng.choice([None, 0.2, 0.5]),
        )
        overrides = [
            f"search.rollouts={rng.randint(1, 10)}",
            f"search.num_samples={rng.randint(2, 6)}",
            f"search.unvisited={rng.choice(['inf', 'zero'])}",
            "search.prompt_style=sft",
            "search.stop_at_output=false",
        ]
        cfg = load_config(preset, overrides=overrides)
        reward = TableReward({"way 0": 0.7, "undefined": -0.8, "boxed": 0.5}, default=-0.2)
        backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward)
        for _, tree, _ in search(cfg, backends, problems(2)):
            check_tree_invariants(tree, ppm_init=cfg.search.ppm_init)
            # No rollout ended at a failed step: each is -1 on itself with one visit (never
            # backed up), and every ancestor counts only answers (and its PPM visit).
            assert all(a.rollout is not None and a.rollout < cfg.search.rollouts for a in tree.answers())


def test_ppm_steers_selection(sandbox, grader):
    # Twelve first steps; the PPM scores one of them 0.95 and the rest -0.5. With the PPM's
    # values ranking unvisited children (and counted as a visit), the first rollout takes the
    # favourite in every search; under the textbook +inf it would get 1 in 12.
    policy = BranchingPolicy(depth=1, valid=12)
    reward = TableReward({"way 7": 0.95}, default=-0.5)
    for preset in ("eval", "round3"):
        cfg = load_config(preset, overrides=["search.rollouts=4", "search.num_samples=12"])
        backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward)
        for _, tree, _ in search(cfg, backends, problems(6)):
            first = min(tree.answers(), key=lambda a: a.rollout)
            assert "way 7" in tree.path(first)[0].text, preset
            favourite = next(c for c in tree.children(tree.root) if "way 7" in c.text)
            assert favourite.N >= 2


def test_depth_limit_as_the_authors(sandbox, grader):
    # A step past max_depth is terminal (too deep); a step at max_depth is not.
    policy = BranchingPolicy(depth=10, valid=1)
    cfg = load_config("round2", overrides=["search.rollouts=2", "search.num_samples=1", "search.max_depth=3"])
    [(_, tree, info)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    assert [n.depth for n in tree.nodes] == [0, 1, 2, 3, 4]
    assert tree.nodes[3].terminal is None and tree.nodes[4].terminal == TOO_DEEP
    assert tree.root.N == 0 and info["answer"] is None


def test_beam_search_attaches_children_to_their_parents(sandbox, grader):
    cfg = load_config("eval", overrides=["search.mode=beam", "search.beam_width=2", "search.num_samples=3"])
    policy = ScriptedPolicy()
    backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=ScriptedReward())
    [(job, tree, info)] = search(cfg, backends, problems(1))
    check_structure(tree)
    prompts = {r.prompt for call in policy.calls for r in call}
    for node in tree.nodes[1:]:
        # the prefix of a node's parent is exactly a prompt the policy was given
        assert tree.prefix(tree.nodes[node.parent]) in prompts
        if node.kind == "answer":
            out = tree.nodes[node.parent].observation
            assert node.answer == out  # copied from its own parent's output, not a sibling's
    assert info["correct"] is True
    assert len({n.id for n in tree.nodes if n.depth == 1 and n.expanded}) <= 2  # beam width


def test_beam_search_keeps_the_best_steps_and_stops_at_width_answers(sandbox, grader):
    # Six running steps and two failing ones per node, width 3: the three best-valued open
    # steps form each beam; failing steps leave it and finish nothing; the search goes on until
    # three answers exist.
    policy = BranchingPolicy(depth=3, valid=6, failing=2)
    reward = TableReward(
        {"way 4": 0.9, "way 1": 0.8, "way 5": 0.7, "way 0": 0.1, "undefined": 0.95}, default=-0.3
    )
    cfg = load_config("eval", overrides=["search.mode=beam", "search.beam_width=3", "search.num_samples=8"])
    backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward)
    for _, tree, info in search(cfg, backends, problems(2)):
        check_structure(tree)
        assert len(tree.answers()) == 3 and info["correct"] is True
        way = lambda n: n.text.split("way ")[1][0]  # noqa: E731
        for depth in (1, 2, 3):
            expanded = [n for n in tree.nodes if n.depth == depth and n.expanded]
            assert len(expanded) == 3  # the width
            # ... and the best three open steps by value, though failing steps scored higher:
            # at the first step three ways, below it each beam node's best child
            want = ["1", "4", "5"] if depth == 1 else ["4", "4", "4"]
            assert sorted(way(n) for n in expanded) == want
        assert all(not n.expanded for n in tree.nodes if n.terminal == CODE_ERROR)
    # Every step fails with probability 0.3 (beam 4 x 4): the search still ends with answers.
    policy = BranchingPolicy(depth=3, valid=2, failing=2, fail_p=0.3)
    cfg = load_config("eval", overrides=["search.mode=beam", "search.beam_width=4", "search.num_samples=4"])
    backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=TableReward(default=0.0))
    results = search(cfg, backends, problems(10))
    assert sum(len(t.answers()) >= 1 for _, t, _ in results) >= 9


def test_best_of_n_and_greedy(sandbox, grader):
    reward = ScriptedReward()
    cfg = load_config(overrides=["search.mode=bon", "search.trajectories=6", "search.terminal_guided=false"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader, reward=reward)
    [(job, tree, info)] = search(cfg, backends, problems(1))
    chains = tree.children(tree.root)
    assert len(chains) == 6  # identical first steps stay separate solutions
    assert all(len(tree.children(c)) <= 1 for c in tree.nodes[1:])
    assert info["correct"] is True  # some chain adds, and the reward model picks it

    cfg = load_config(overrides=["search.mode=greedy"])
    [(job, tree, info)] = search(cfg, backends, problems(1))
    assert len(tree.answers()) == 1 and info["correct"] is False  # greedy takes the first (wrong) step


def test_scheduler_batches_across_problems(sandbox, grader):
    cfg = load_config(
        "round2", overrides=["search.rollouts=3", "search.num_samples=2", "scheduler.max_inflight=8"]
    )
    policy = ScriptedPolicy()
    backends = Backends(policy=policy, sandbox=sandbox, grader=grader)
    results = search(cfg, backends, problems(8))
    assert len(results) == 8 and len({j.key for j, _, _ in results}) == 8
    per_call = [len({r.prompt.split("What is ")[1].split("?")[0] for r in call}) for call in policy.calls]
    assert max(per_call) >= 6  # one model call carries steps of many problems
    # distinct, recorded seeds per search
    seeds = {r.seed for call in policy.calls for r in call}
    assert len(seeds) == sum(len(call) for call in policy.calls)


def test_generate_writes_and_resumes_tree_files(tmp_path, sandbox, grader):
    cfg = load_config("round2", overrides=["search.rollouts=2", "search.num_samples=2"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader)
    probs = problems(5)
    generate(probs[:3], cfg, tmp_path, backends=backends, show_progress=False)
    path = tmp_path / "trees.jsonl"
    # simulate a kill in the middle of writing the 4th line
    with open(path, "ab") as f:
        f.write(b'{"key": "add:3#0", "tree": {"nod')
    stats = generate(probs, cfg, tmp_path, resume=True, backends=backends, show_progress=False)
    assert stats.done == 2
    recs = list(iter_records(path))
    assert sorted(r["key"] for r in recs) == [f"add:{i}#0" for i in range(5)]
    rec = recs[0]
    assert rec["config"]["search"]["rollouts"] == 2 and "rstar" in rec["versions"]
    assert Tree.from_dict(rec["tree"]).to_dict() == rec["tree"]
    assert json.loads(path.read_text().splitlines()[-1])["key"].startswith("add:")
    # without --resume an existing run is not overwritten
    with pytest.raises(ValueError, match="--resume"):
        generate(probs, cfg, tmp_path, backends=backends, show_progress=False)


def test_solve_prints_the_chosen_trajectory(sandbox, grader):
    from rstar.search.solve import format_trajectory, solve

    cfg = load_config("eval", overrides=["search.rollouts=6", "search.num_samples=4"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader, reward=ScriptedReward())
    tree = solve("What is 20 + 22?", cfg, backends, gold="42")
    text = format_trajectory(tree)
    assert "x = 20 + 22" in text and "=== answer: 42 (correct)" in text
    assert "[code_end]" in text and "<output>42<end_of_output>" in text
    with pytest.raises(ValueError, match="needs a reward model"):
        solve("What is 1 + 2?", cfg, Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader))


class _Misleading(ScriptedReward):
    """A reward model that prefers wrong answers."""

    def score(self, prefixes, steps):
        return [-v for v in super().score(prefixes, steps)]


def test_data_generation_settles_by_q_even_with_ppm_values(sandbox, grader):
    # round 3: q is PPM-initialised, but the answer a data-generation search settles on comes
    # from the graded terminal values, however the PPM scores it
    cfg = load_config("round3", overrides=["search.rollouts=8", "search.num_samples=4"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader, reward=_Misleading())
    [(job, tree, info)] = search(cfg, backends, problems(1))
    assert info["correct"] is True and info["answer"] == job.problem.answer
    assert best_answer_node(tree, by_value=True).correct is False  # what the PPM alone would pick


# --- terminals, answer samples, rollout stamps (issue 22) ------------------------------------


class _OddEnds(BranchingPolicy):
    """BranchingPolicy whose first step may also be cut off by the token limit (no tag: a
    TRUNCATED terminal) or an answer with no \\boxed{} (a NO_ANSWER terminal)."""

    CUT = "<code>\n# Step 1: the step runs out of tokens before its ta"
    UNBOXED = "<answer>I cannot tell.<end_of_answer>"

    def generate(self, requests):
        out = super().generate(requests)
        for r, outs in zip(requests, out):
            if not r.prompt.rsplit("solve the problem with code.", 1)[1]:  # the first step
                outs[0].text, outs[0].stop_reason, outs[0].n_tokens = self.CUT, "length", 17
                outs[1].text = self.UNBOXED
        return out


def test_truncated_and_unboxed_steps_are_pruned_terminals_stamped_with_their_rollout(sandbox, grader):
    policy = _OddEnds(depth=1, valid=3)
    cfg = load_config("round2", overrides=["search.rollouts=4", "search.num_samples=4"])
    [(_, tree, info)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    firsts = tree.children(tree.root)
    cut = [c for c in firsts if c.text == _OddEnds.CUT]
    unboxed = [c for c in firsts if c.text == _OddEnds.UNBOXED]
    assert len(cut) == 1 and cut[0].terminal == TRUNCATED and cut[0].kind == "partial"
    assert (cut[0].stop_reason, cut[0].n_tokens) == ("length", 17)  # as the policy reported
    assert len(unboxed) == 1 and unboxed[0].terminal == NO_ANSWER and unboxed[0].answer is None
    for node in cut + unboxed:
        assert (node.q, node.N, node.rollout) == (-1.0, 1, 0)  # made by the first rollout, pruned
        assert not node.expanded
    assert info["correct"] is True and all(a.correct for a in tree.answers())


def test_an_ended_program_gets_answer_samples_children_and_others_num_samples(sandbox, grader):
    cfg = load_config(
        "round2", overrides=["search.rollouts=3", "search.num_samples=5", "search.answer_samples=2"]
    )
    policy = BranchingPolicy(depth=1, valid=2)
    [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    ns: dict[str, set[int]] = {"output": set(), "step": set()}
    for call in policy.calls:
        for r in call:
            ns["output" if r.prompt.endswith("<end_of_output>") else "step"].add(r.n)
    assert ns == {"output": {2}, "step": {5}}
    assert any(n.kind == "code_end" and n.expanded for n in tree.nodes)


def test_two_failed_steps_in_a_row_reach_code_error_at_threshold_two(sandbox, grader):
    # Round 1 (threshold 2): a failing first step stays open with streak 1; every step below it
    # runs the failing code again, so its children reach streak 2 and are CODE_ERROR terminals,
    # which closes the failed step.
    cfg = load_config(
        "round1",
        overrides=[
            "search.rollouts=4",
            "search.num_samples=2",
            "search.unvisited=inf",
            "search.prompt_style=sft",
            "search.stop_at_output=false",
        ],
    )
    policy = BranchingPolicy(depth=2, valid=1, failing=1)
    [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    [failed] = [c for c in tree.children(tree.root) if "undefined" in c.text]
    assert failed.terminal is None and failed.error_streak == 1 and failed.expanded
    below_failed = tree.children(failed)
    assert len(below_failed) == 2
    assert all(c.error_streak == 2 and c.terminal == CODE_ERROR for c in below_failed)
    assert (failed.q, failed.N) == (0.0, 0)  # nothing was backed up through it
    # the same tree at threshold 1: the first failure is the terminal
    cfg = load_config("round2", overrides=["search.rollouts=4", "search.num_samples=2"])
    [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    [failed] = [c for c in tree.children(tree.root) if "undefined" in c.text]
    assert failed.terminal == CODE_ERROR and failed.error_streak == 1 and not failed.expanded


def test_rollout_stamps_give_evaluation_its_rollout_budgets(sandbox, grader):
    """`rstar eval --mcts-unit rollouts` reads a budget of k rollouts as the terminals the
    first k rollouts reached; with three programs per step every rollout finds a new answer."""
    from rstar.evaluate import budget_held, group_by_problem, within

    policy = BranchingPolicy(depth=2, valid=3, failing=1)
    cfg = load_config("round2", overrides=["search.rollouts=6", "search.num_samples=4"])
    [(job, tree, info)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    rec = {
        "problem": job.problem.to_dict(),
        "mode": "mcts",
        "tree": tree.to_dict(),
        "config": {"search": {"rollouts": 6}},
    }
    [(_, trajs)] = group_by_problem([rec], unit="rollouts").values()
    stamped = [n for n in tree.nodes if n.rollout is not None]
    assert stamped == [n for n in tree.nodes if n.is_terminal]  # every terminal, and only those
    assert [t.order for t in trajs] == sorted(n.rollout for n in stamped)
    assert sorted(a.rollout for a in tree.answers()) == list(range(6))
    for k in range(1, 7):
        got = within(trajs, k)
        assert sum(t.answer is not None for t in got) == k  # one new answer per rollout
        assert len(got) == sum(1 for n in stamped if n.rollout < k)
    assert budget_held([rec], unit="rollouts") == 6 and budget_held([rec]) == 1
    # per search, the one answer it settles on
    [(_, trajs)] = group_by_problem([rec]).values()
    assert len(trajs) == 1 and trajs[0].answer == info["answer"]


# --- a real (toy) PPM drives the search -------------------------------------------------------


class GoodBadPolicy(BranchingPolicy):
    """Step 1 adds; at step 2 three candidates say `good` and keep the sum, three say `bad` and
    double it; then y is printed and copied into the answer. The toy PPM of conftest learned
    to prefer `good` steps (in this very format), knowing nothing of the sums."""

    def _candidates(self, prompt: str) -> tuple[list[str], list[str]]:
        a, b, k, out = self.position(prompt)
        if out is not None:
            return [ANSWER_STEP.format(out=out)], []
        if k == 0:
            return [f"<code>\n# Step 1: add\nx = {a} + {b}\n<end_of_step>"], []
        if k == 1:
            good = [f"\n\n# Step 2: good\ny = x * 1 + {j} * 0\n<end_of_step>" for j in range(3)]
            bad = [f"\n\n# Step 2: bad\ny = x * 2 + {j} * 0\n<end_of_step>" for j in range(3)]
            return good + bad, []
        return ["\n\n# Now print the final answer\nprint(y)\n<end_of_code>"], []


@pytest.fixture(scope="module", params=["ppm", "implicit"])
def toy_reward(request, torch_one_thread):
    """A real reward model that prefers `good` steps: the toy PPM (a value head), or the toy
    implicit reward (a DPO-trained policy scored against its reference)."""
    from rstar.models.ppm import load_reward_model

    fixture = "toy_ppm" if request.param == "ppm" else "toy_implicit"
    return load_reward_model(request.getfixturevalue(fixture)[0], device="cpu")


def test_a_real_ppm_steers_inference_mcts(sandbox, grader, toy_reward):
    cfg = load_config("eval", overrides=["search.rollouts=3", "search.num_samples=6"])
    backends = Backends(policy=GoodBadPolicy(), sandbox=sandbox, grader=grader, reward=toy_reward)
    for _, tree, _ in search(cfg, backends, problems(3)):
        check_tree_invariants(tree, ppm_init=True)
        second = [n for n in tree.nodes if n.depth == 2]
        good = [n for n in second if "good" in n.text]
        bad = [n for n in second if "bad" in n.text]
        assert len(good) == len(bad) == 3
        assert min(n.value for n in good) > max(n.value for n in bad)  # the PPM's own ranking
        # unvisited siblings are ranked by their PPM values: every rollout takes a good step
        # (each has a visit of its own, so the best is revisited only if it stays the best)
        for a in tree.answers():
            assert "good" in tree.path(a)[1].text and a.correct, a
        assert all(n.N == 1 for n in bad)  # the PPM initialisation, nothing backed up


def test_a_real_ppm_ranks_the_beam(sandbox, grader, toy_reward):
    cfg = load_config("eval", overrides=["search.mode=beam", "search.beam_width=2", "search.num_samples=6"])
    backends = Backends(policy=GoodBadPolicy(), sandbox=sandbox, grader=grader, reward=toy_reward)
    for job, tree, info in search(cfg, backends, problems(3)):
        check_structure(tree)
        second = [n for n in tree.nodes if n.depth == 2]
        expanded = [n for n in second if n.expanded]
        assert len(second) == 6 and len(expanded) == 2  # the width
        top2 = sorted(second, key=lambda n: n.value, reverse=True)[:2]
        assert expanded == sorted(top2, key=lambda n: n.id)  # chosen by the PPM's values ...
        assert all("good" in n.text for n in expanded)  # ... which prefer the good steps
        assert len(tree.answers()) == 2 and info["correct"] is True and info["answer"] == job.problem.answer


def test_best_of_n_samples_n_chains_then_one_step_each_and_scores_only_answers(sandbox, grader):
    policy, reward = ScriptedPolicy(), ScriptedReward()
    cfg = load_config(overrides=["search.mode=bon", "search.trajectories=5", "search.temperature=0.6"])
    [(job, tree, _)] = search(
        cfg, Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward), problems(1)
    )
    first, *rest = policy.calls
    assert [r.n for r in first] == [5] and all(r.n == 1 for call in rest for r in call)
    assert all(r.temperature == 0.6 for call in policy.calls for r in call)
    assert reward.calls == 1  # one Score request, for the answers only
    a, b = numbers(job.problem.question)
    for node in tree.nodes[1:]:
        if node.terminal == ANSWER:
            assert node.value == (0.9 if node.answer == str(a + b) else -0.9)
        else:
            assert node.value is None
    # every chain ends: an answer or a failed step, never an open node
    assert all(n.is_terminal or n.children for n in tree.nodes)
    # without a reward model nothing is scored
    [(_, tree, _)] = search(
        cfg, Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader), problems(1)
    )
    assert tree.answers() and all(n.value is None for n in tree.nodes)
    # greedy: one chain at temperature 0
    greedy_policy = ScriptedPolicy()
    cfg = load_config(overrides=["search.mode=greedy", "search.temperature=0.6"])
    [(_, tree, _)] = search(cfg, Backends(policy=greedy_policy, sandbox=sandbox, grader=grader), problems(1))
    assert all((r.n, r.temperature) == (1, 0.0) for call in greedy_policy.calls for r in call)
    assert [n.depth for n in tree.nodes] == [0, 1, 2, 3]


def test_parallel_rollouts_keep_the_invariants_and_batch_their_leaves(sandbox, grader):
    """search.parallel_rollouts: several walkers descend at once; their virtual losses are
    taken back, each rollout is stamped on what it reached, and the distinct leaves of one
    step of the walkers go to the policy in one call."""
    for preset, ppm in (("round2", False), ("round3", True), ("eval", True)):
        calls = {}
        for k in (1, 2, 4):
            cfg = load_config(
                preset,
                overrides=["search.rollouts=8", "search.num_samples=3", f"search.parallel_rollouts={k}"],
            )
            policy = BranchingPolicy(depth=2, valid=3, wrong=1, failing=1)
            reward = TableReward({"way 0": 0.6, "undefined": -0.8, "boxed": 0.5}, default=-0.1)
            backends = Backends(policy=policy, sandbox=sandbox, grader=grader, reward=reward if ppm else None)
            for _, tree, _ in search(cfg, backends, problems(2)):
                check_tree_invariants(tree, ppm_init=ppm)
                assert all(r is not None and 0 <= r < 8 for r in (a.rollout for a in tree.answers()))
                assert len(tree.answers()) >= 2
            # A search waits for each of its Generate requests, so the model calls that carry
            # a problem's prompts count that search's expansion batches (however the scheduler
            # groups searches into calls).
            per_search = [
                [sum(1 for r in call if p.question in r.prompt) for call in policy.calls] for p in problems(2)
            ]
            calls[k] = sum(sum(1 for n in counts if n) for counts in per_search)
            if k > 1:  # after the root's expansion, one batch carries several nodes of a search
                assert max(max(counts) for counts in per_search) >= 2, per_search
            assert max(max(counts) for counts in per_search) <= k, per_search  # k walkers at most
        assert calls[4] < calls[1] and calls[2] < calls[1], calls


def test_which_searches_need_a_reward_model(sandbox, grader):
    from rstar.search.expand import needs_reward

    want = {"round1": False, "round2": False, "round3": True, "round4": True, "eval": True}
    for preset, need in want.items():
        assert needs_reward(load_config(preset).search) is need, preset
    for mode, need in (("beam", True), ("bon", False), ("greedy", False)):
        assert needs_reward(load_config("round2", overrides=[f"search.mode={mode}"]).search) is need, mode
    # greedy with a reward model scores its answer
    cfg = load_config(overrides=["search.mode=greedy"])
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader, reward=ScriptedReward())
    [(_, tree, _)] = search(cfg, backends, problems(1))
    [answer] = tree.answers()
    assert answer.value == -0.9  # greedy subtracts; the reward model says so


def test_beam_search_stops_once_width_answers_exist_across_steps(sandbox, grader):
    # Width 3. Two answers at step 3 (below a and b), then c's branch goes on: at step 5 its
    # first answer makes three, and the search stops though c5 is still open. Counting only
    # one step's answers, or stopping at more than the width, would expand c5; counting from
    # one would stop at step 3, before c3.
    from scripted import ExplicitPolicy

    tree_shape = {
        "": ["a", "b", "c"],
        "a": ["pa"],
        "b": ["pb"],
        "c": ["c2"],
        "c2": ["c3"],
        "c3": ["pc3", "c4"],
        "c4": ["c5"],
        "c5": ["pc5"],
    }
    cfg = load_config("eval", overrides=["search.mode=beam", "search.beam_width=3", "search.num_samples=3"])
    backends = Backends(
        policy=ExplicitPolicy(tree_shape), sandbox=sandbox, grader=grader, reward=TableReward(default=0.0)
    )
    [(job, tree, info)] = search(cfg, backends, problems(1))
    check_structure(tree)
    label = {n.id: (re.findall(r"# label (\w+)\n", n.text) or ["answer"])[0] for n in tree.nodes[1:]}
    expanded = sorted(label[n.id] for n in tree.nodes[1:] if n.expanded)
    assert expanded == ["a", "b", "c", "c2", "c3", "c4", "pa", "pb", "pc3"]
    assert len(tree.answers()) == 3 and all(a.correct for a in tree.answers())
    assert info["answer"] == job.problem.answer


def test_terminal_values():
    from rstar.search.expand import terminal_value
    from rstar.search.tree import Node

    guided = load_config("round2").search
    inference = load_config("eval").search
    for kind in (CODE_ERROR, TOO_DEEP, TRUNCATED, NO_ANSWER):
        node = Node(id=1, parent=0, depth=1, text="", terminal=kind, value=0.7, correct=True)
        assert terminal_value(node, guided) == terminal_value(node, inference) == -1.0
    right = Node(id=1, parent=0, depth=1, text="", terminal=ANSWER, correct=True, value=-0.3)
    wrong = Node(id=2, parent=0, depth=1, text="", terminal=ANSWER, correct=False, value=0.4)
    assert (terminal_value(right, guided), terminal_value(wrong, guided)) == (1.0, -1.0)
    assert (terminal_value(right, inference), terminal_value(wrong, inference)) == (-0.3, 0.4)
    wrong.value = None
    with pytest.raises(RuntimeError, match="^inference search needs reward-model values on answer nodes$"):
        terminal_value(wrong, inference)


def test_a_search_prompts_and_requests_with_its_settings(sandbox, grader):
    from rstar.steps import build_prompt

    for style in ("sft", "fewshot"):
        cfg = load_config(
            "round2",
            overrides=[
                "search.rollouts=1",
                "search.num_samples=2",
                f"search.prompt_style={style}",
                "search.max_new_tokens=77",
                "search.top_p=0.5",
                "search.temperature=0.3",
            ],
        )
        policy = ScriptedPolicy()
        [(job, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
        assert tree.question == job.problem.question
        assert tree.prompt == build_prompt(job.problem.question, style)
        assert policy.calls[0][0].prompt == tree.prompt
        for call in policy.calls:
            for r in call:
                assert (r.max_new_tokens, r.top_p, r.temperature) == (77, 0.5, 0.3)
                assert r.stop == STOP_STRINGS  # round 2 does not stop at <end_of_output>
    cfg = load_config(
        "round1", overrides=["search.rollouts=1", "search.num_samples=2", "search.prompt_style=sft"]
    )
    policy = ScriptedPolicy()
    search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    assert all(r.stop == ROUND1_STOP_STRINGS for call in policy.calls for r in call)


class _Repeats(ScriptedPolicy):
    """Samples the first step as [subtract, subtract, add, helper]: a duplicate before new ones."""

    def generate(self, requests):
        out = super().generate(requests)
        for r, outs in zip(requests, out):
            if len(outs) == 4 and "x = " in outs[0].text and "<code>" in outs[0].text:
                texts = [s.format(a=numbers(r.prompt)[0], b=numbers(r.prompt)[1]) for s in FIRST_STEPS]
                for c, t in zip(outs, [texts[0], texts[0], texts[1], texts[2]]):
                    c.text = t
        return out


def test_identical_samples_merge_and_the_rest_are_kept(sandbox, grader):
    cfg = load_config("round2", overrides=["search.rollouts=1", "search.num_samples=4"])
    [(_, tree, _)] = search(cfg, Backends(policy=_Repeats(), sandbox=sandbox, grader=grader), problems(1))
    firsts = [c.text for c in tree.children(tree.root)]
    assert len(firsts) == 3 and len(set(firsts)) == 3


def test_uct_has_no_exploration_term_while_the_parent_has_one_visit():
    tree = Tree.new("q", "p")
    child = tree.add_child(tree.root, "a")
    child.N, child.q = 1, 0.4
    for n in (0, 1):
        tree.root.N = n
        assert uct(child, tree.root, 2.0, "inf") == 0.4
    tree.root.N = 2
    assert uct(child, tree.root, 2.0, "inf") == pytest.approx(0.4 + 2.0 * math.sqrt(math.log(2)))


def test_parallel_rollouts_start_every_rollout_once(sandbox, grader):
    # Eight distinct first steps, each a program with one answer: every rollout, in batches of
    # four walkers, takes a first step of its own and ends at a new answer stamped with it.
    policy = BranchingPolicy(depth=1, valid=8)
    cfg = load_config(
        "round2",
        overrides=["search.rollouts=8", "search.num_samples=8", "search.parallel_rollouts=4"],
    )
    [(_, tree, _)] = search(cfg, Backends(policy=policy, sandbox=sandbox, grader=grader), problems(1))
    check_tree_invariants(tree)
    assert sorted(a.rollout for a in tree.answers()) == list(range(8))
    assert tree.root.N == 8 and tree.root.q == 8.0


class _CountingGrader:
    """The real grader, recording the (gold, prediction) pairs of each call."""

    def __init__(self, grader):
        self.grader, self.calls = grader, []

    def grade_many(self, pairs):
        self.calls.append(list(pairs))
        return self.grader.grade_many(pairs)


def test_answers_are_graded_only_when_there_is_a_gold_answer_and_an_answer(sandbox, grader):
    from rstar.search.solve import solve

    cfg = load_config("eval", overrides=["search.rollouts=6", "search.num_samples=4"])
    counting = _CountingGrader(grader)
    backends = Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=counting, reward=ScriptedReward())
    tree = solve("What is 20 + 22?", cfg, backends)  # inference: no gold answer, nothing graded
    assert tree.answers() and all(a.correct is None for a in tree.answers())
    assert counting.calls == []
    tree = solve("What is 20 + 22?", cfg, backends, gold="42")
    # one call per expansion that made answers (never an empty one), each against the gold
    assert counting.calls and all(counting.calls)
    assert {g for call in counting.calls for g, _ in call} == {"42"}
    assert {a.answer for a in tree.answers() if a.correct} == {"42"}


def test_scoring_without_a_reward_model_names_what_is_missing():
    from rstar.models.base import Completion
    from rstar.search.expand import SearchContext, expand

    ctx = SearchContext(cfg=load_config("eval").search, question="What is 1 + 2?")
    tree = ctx.new_tree()
    steps = expand(tree, ctx, [tree.root], 1, score=True)
    next(steps)  # the Generate request
    with pytest.raises(RuntimeError, match=r"^this search needs a reward model \(--ppm\) to score steps$"):
        steps.send([[Completion(text="<answer>\\boxed{3}<end_of_answer>", stop_reason="stop", n_tokens=5)]])


def test_mcts_is_reproducible_sequential_or_parallel(sandbox, grader):
    # Twelve first steps ranked alike: which ones the rollouts take is a tie broken by the
    # search's seeded generator, so the same search gives the same tree.
    for k in (1, 2):
        cfg = load_config(
            "round2",
            overrides=["search.rollouts=4", "search.num_samples=12", f"search.parallel_rollouts={k}"],
        )
        trees = [
            search(
                cfg,
                Backends(policy=BranchingPolicy(depth=1, valid=12), sandbox=sandbox, grader=grader),
                problems(1),
            )[0][1]
            for _ in range(3)
        ]
        assert trees[0].to_dict() == trees[1].to_dict() == trees[2].to_dict(), k


def test_which_searches_settle_by_value():
    from rstar.search.expand import settles_by_value

    want = {"round1": False, "round2": False, "round3": False, "round4": False, "eval": True}
    for preset, by_value in want.items():
        assert settles_by_value(load_config(preset).search) is by_value, preset
    for mode in ("beam", "bon", "greedy"):  # whatever terminal_guided says
        for guided in ("true", "false"):
            cfg = load_config("round2", overrides=[f"search.mode={mode}", f"search.terminal_guided={guided}"])
            assert settles_by_value(cfg.search) is True, (mode, guided)


def test_best_answer_node_by_value_by_q_or_as_the_tree_says():
    tree = Tree.new("q", "p")
    liked = tree.add_child(tree.root, "a", kind="answer", terminal=ANSWER, value=0.9, q=-1.0, N=1)
    right = tree.add_child(tree.root, "b", kind="answer", terminal=ANSWER, value=0.1, q=1.0, N=1)
    assert best_answer_node(tree, by_value=True) is liked
    assert best_answer_node(tree, by_value=False) is right
    assert best_answer_node(tree) is liked  # values on every answer: by value
    right.value = None
    assert best_answer_node(tree) is right and best_answer_node(tree, by_value=True) is right  # by Q
    assert best_answer_node(Tree.new("q", "p")) is None


def test_a_prefix_is_the_prompt_and_the_steps_as_written():
    tree = Tree.new("What is 1 + 2?", "PROMPT|")
    assert (tree.root.text, tree.root.kind, tree.prefix(tree.root)) == ("", "root", "PROMPT|")
    a = tree.add_child(tree.root, "<code>\nx = 1\n<end_of_step>")
    b = tree.add_child(a, "\n\ny = 2\n<end_of_step>")
    assert tree.prefix(b) == "PROMPT|<code>\nx = 1\n<end_of_step>\n\ny = 2\n<end_of_step>"
    assert tree.to_dict()["nodes"][0]["text"] == ""  # the root holds no step in a tree file


def test_one_rollout_at_a_time_is_the_sequential_search(sandbox, grader, monkeypatch):
    # parallel_rollouts=1 (data generation) runs the sequential loop, never the walkers' loop
    # (whose virtual losses change UCT's exploration term below the walker)
    import importlib

    mcts_module = importlib.import_module("rstar.search.mcts")  # the package's `mcts` is the function

    def walkers(ctx):
        raise AssertionError("parallel_rollouts=1 ran the parallel loop")
        yield

    monkeypatch.setattr(mcts_module, "mcts_parallel", walkers)
    cfg = load_config("round2", overrides=["search.rollouts=3", "search.num_samples=3"])
    assert cfg.search.parallel_rollouts == 1
    [(_, tree, _)] = search(
        cfg, Backends(policy=ScriptedPolicy(), sandbox=sandbox, grader=grader), problems(1)
    )
    assert tree.answers()
