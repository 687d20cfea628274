"""The synthetic math world: determinism, disjoint splits, executable reference solutions in
the step format, growing difficulty, distractors and varied phrasing."""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import defaultdict

import pytest

from rstar import steps
from rstar.data import world
from rstar.data.problems import Problem, load_problems

CFG = world.WorldConfig()
N_SPLIT = 200  # per level, for the split checks
N_CHECK = 80  # per level, for solution checks (executed)


@pytest.fixture(scope="module")
def train() -> list[Problem]:
    return world.make_split("train", N_SPLIT, CFG, seed=0)


@pytest.fixture(scope="module")
def test_split() -> list[Problem]:
    return world.make_split("test", N_SPLIT, CFG, seed=0)


def by_level(problems: list[Problem]) -> dict[str, list[Problem]]:
    out: dict[str, list[Problem]] = defaultdict(list)
    for p in problems:
        out[p.level].append(p)
    return out


def run_programs(sandbox, programs: list[str]) -> list[str]:
    """stdout of each program, run in the project's sandbox as a search runs a trajectory."""
    results = sandbox.run_many(programs)
    for src, r in zip(programs, results):
        assert r.ok, (r, src)
    return [r.stdout for r in results]


def test_deterministic_by_seed():
    a = [p.to_dict() for p in world.make_split("train", 15, CFG, seed=0)]
    b = [p.to_dict() for p in world.make_split("train", 15, CFG, seed=0)]
    c = [p.to_dict() for p in world.make_split("train", 15, CFG, seed=1)]
    assert a == b
    assert [p["question"] for p in a] != [p["question"] for p in c]
    # generate_problem depends on the rng state only
    p1 = world.generate_problem(random.Random(7), 4, CFG)
    p2 = world.generate_problem(random.Random(7), 4, CFG)
    assert p1.to_dict() == p2.to_dict()
    # a shorter split is a prefix of a longer one (per-level random streams)
    short = world.make_split("test", {3: 5}, CFG, seed=0)
    longer = world.make_split("test", {3: 10}, CFG, seed=0)
    assert [p.to_dict() for p in short] == [p.to_dict() for p in longer[:5]]


def test_splits_disjoint_and_well_formed(train, test_split):
    for split, probs in (("train", train), ("test", test_split)):
        assert len(probs) == N_SPLIT * CFG.n_levels
        questions = [p.question for p in probs]
        assert len(set(questions)) == len(questions), "duplicate question inside a split"
        levels = by_level(probs)
        assert sorted(levels) == ["1", "2", "3", "4"]
        for lv, ps in levels.items():
            assert [p.id for p in ps] == [f"world-{split}:L{lv}:{i}" for i in range(N_SPLIT)]
            assert all(p.source == "world" for p in ps)
        assert all(world.split_of(q, CFG) == split for q in questions)
    assert not {p.question for p in train} & {p.question for p in test_split}
    # the hash decides, not the seed: another seed's test set is still disjoint from train
    other = world.make_split("test", 30, CFG, seed=5)
    assert not {p.question for p in train} & {p.question for p in other}


def test_reference_solutions_are_step_format_and_execute(train, test_split, sandbox):
    sample = [p for ps in by_level(train).values() for p in ps[:N_CHECK]]
    sample += [p for ps in by_level(test_split).values() for p in ps[: N_CHECK // 4]]
    programs = []
    for p in sample:
        sol = p.meta["solution"]
        parts = steps.split_steps(sol)
        assert "".join(parts) == sol
        assert sol.startswith(steps.CODE_OPEN + "\n# Step 1: ")
        kinds = [steps.parse_step(s).kind for s in parts]
        assert kinds == ["code"] * (p.meta["n_ops"] + 1) + ["code_end", "answer"], p.id
        for i, s in enumerate(parts[:-2], start=1):
            lines = s.strip("\n").split("\n")
            assert lines[-1] == steps.END_OF_STEP
            assert lines[:-3] == ([steps.CODE_OPEN] if i == 1 else []), s
            assert re.fullmatch(rf"# Step {i}: [^\n]+", lines[-3]), s
            assert re.fullmatch(r"[a-z_]+ = [a-z_0-9]+( [-+*/]{1,2} [a-z_0-9]+)*", lines[-2]), lines[-2]
        assert parts[-2].endswith(steps.wrap_output(p.answer))
        assert steps.final_answer(parts) == p.answer
        assert steps.extract_boxed(sol) == p.answer
        assert 2 <= int(p.answer) <= CFG.max_value
        programs.append(steps.program(parts))
    outputs = run_programs(sandbox, programs)
    for p, out in zip(sample, outputs):
        assert out == p.answer + "\n", (p.id, p.question, out)


def test_every_step_of_the_program_runs_on_its_own_prefix(train, sandbox):
    # The search executes the code of all steps so far after every step: each prefix of a
    # reference solution must be a valid program too.
    p = by_level(train)["4"][0]
    parts = steps.split_steps(p.meta["solution"])
    outs = run_programs(sandbox, [steps.program(parts[:i]) for i in range(1, len(parts))])
    assert outs[:-1] == [""] * (len(parts) - 2) and outs[-1] == p.answer + "\n"


def test_levels_grow_in_steps(train):
    means = []
    for lv in ("1", "2", "3", "4"):
        ps = by_level(train)[lv]
        means.append(statistics.mean(len(steps.split_steps(p.meta["solution"])) for p in ps))
        spec = CFG.levels[int(lv) - 1]
        assert all(spec.min_ops <= p.meta["n_ops"] <= spec.max_ops for p in ps)
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_distractors_as_specified_and_unused_by_the_solution(train):
    levels = by_level(train)
    assert all(p.meta["distractors"] == [] for p in levels["1"])
    for lv in ("2", "3", "4"):
        for p in levels[lv]:
            ds = p.meta["distractors"]
            assert len(ds) == CFG.levels[int(lv) - 1].distractors >= 1
            used = world.code_numbers(p.meta["solution"])
            for n in ds:
                assert re.search(rf"\b{n}\b", p.question), (n, p.question)
                assert n not in used, (n, p.question)
    # the top level mixes multiplication and exact division
    for p in levels["4"]:
        assert set(p.meta["ops"]) & set(world.MULTIPLICATIVE_KINDS)
        assert set(p.meta["ops"]) & set(world.DIVISION_KINDS)


def _program_lines(solution: str) -> tuple[list[str], str]:
    """The code lines of a reference solution (comments and the print left out) and the
    variable it prints."""
    code = steps.program(steps.split_steps(solution))
    lines = [ln for ln in code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    final = re.fullmatch(r"print\((\w+)\)", lines[-1])
    assert final, lines
    return lines[:-1], final.group(1)


def test_shortcut_answers_of_a_program_with_lines_left_out():
    lines = ["x = 19", "x = x + 24", "x = x - 5", "x = x // 2", "x = x + 19"]
    got = world.shortcut_answers(lines, "x")
    assert 38 in got  # 19 + 19: the first three operations skipped lands on the gold answer
    assert {19, 19 + 24} <= got  # every operation skipped; all but the first skipped
    assert world.shortcut_answers(["x = 2", "x = x * 10"], "x") == {2}  # the full program (20) is not one
    # without the line that sets z, "y = z * 2" fails and that program is left out
    assert world.shortcut_answers(["y = 3", "z = y + 1", "y = z * 2"], "y") == {3}


def test_no_answer_is_reachable_by_skipping_sentences(train):
    """The gold answer of every problem differs from what any program skipping some of its
    operations prints; without the rule, such stories are common at the top level."""
    for p in train:
        lines, final = _program_lines(p.meta["solution"])
        assert int(p.answer) not in world.shortcut_answers(lines, final), p.question
    loose = world.make_split("train", {4: 60}, world.WorldConfig(no_shortcuts=False), seed=0)
    hits = [p for p in loose if int(p.answer) in world.shortcut_answers(*_program_lines(p.meta["solution"]))]
    assert len(hits) >= 3, len(hits)


def test_varied_phrasings(train):
    seen: dict[str, set[str]] = defaultdict(set)
    for p in train:
        for ph in p.meta["phrasings"]:
            kind, tid = ph.split(":")
            seen[kind].add(tid)
    for kind in world.ALL_KINDS:
        assert len(seen[kind]) >= 3, (kind, seen[kind])
    # and no phrasing is dead: every template of every kind is used somewhere
    for kind, templates in CFG.templates.items():
        assert len(seen[kind]) == len(templates), (kind, seen[kind])


def test_pronouns_only_follow_their_person(train):
    # "She"/"He" opens a sentence only right after a sentence whose subject is a person of
    # that gender (a name, or the same pronoun), so no pronoun is ambiguous or dangling.
    gender = dict(CFG.names)
    pron = {"She": "f", "He": "m"}
    n_pronouns = 0
    for p in train:
        sentences = re.split(r"(?<=[.?]) ", p.question)
        assert sentences[0].split()[0] in gender, p.question
        for prev, cur in zip(sentences, sentences[1:]):
            first = cur.split()[0]
            if first in pron:
                n_pronouns += 1
                before = prev.split()[0]
                assert before == first or gender.get(before) == pron[first], (prev, cur)
    assert n_pronouns > len(train)  # and pronouns are common


def test_seed_records_and_corpus(train):
    recs = world.seed_sft_records(train, levels=[1, "2"])
    assert len(recs) == 2 * N_SPLIT
    assert set(recs[0]) == {"query", "response"}
    assert recs[0]["response"].startswith(steps.CODE_OPEN)
    assert len(world.seed_sft_records(train)) == len(train)
    corpus = world.tokenizer_corpus(CFG, n=40)
    assert len(corpus) == 41
    assert corpus[0].startswith(steps.USER_TAG) and steps.ASSISTANT_HEADER + steps.CODE_OPEN in corpus[0]
    vocab = corpus[-1]
    assert all(name in vocab for name, _ in CFG.names)


def test_config_roundtrip():
    cfg = world.WorldConfig(max_value=500, test_fraction=0.3)
    back = world.WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_write_world_loads(tmp_path):
    paths = world.write_world(tmp_path, CFG, n_train_per_level=6, n_test_per_level={4: 3}, seed=2)
    assert paths["train"].name == "train.jsonl" and paths["test"].name == "test.jsonl"
    recs = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(recs) == 24
    probs = [Problem.from_dict(r) for r in recs]
    assert [p.level for p in probs] == [str(lv) for lv in (1, 2, 3, 4) for _ in range(6)]
    assert probs[0].meta["solution"].startswith(steps.CODE_OPEN)
    loaded = load_problems(str(paths["test"]))
    assert [p.level for p in loaded] == ["4"] * 3
    assert [p.answer for p in loaded] == [
        r["answer"] for r in map(json.loads, paths["test"].read_text().splitlines())
    ]
    assert [p.question for p in loaded] == [
        r["question"] for r in map(json.loads, paths["test"].read_text().splitlines())
    ]
