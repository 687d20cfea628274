"""The stages of `rstar evolve` one at a time, with the scripted policy or recording stand-ins
for training (issue 22): round 4's passes over unsolved problems (`extra*/`), the fallback of a
PPM-initialised round that has no PPM yet, which rounds' pairs a PPM trains on
(`ppm_pair_rounds`), where each round's policy starts (`sft_init`), and a PPM carried forward
past a round that trained none."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import pytest

from rstar import evolve
from rstar.config import ConfigError, load_config
from rstar.data.problems import Problem
from rstar.models.base import Completion
from rstar.search.scheduler import Backends
from rstar.search.treefile import iter_records
from scripted import BranchingPolicy, TableReward, numbers


class OddFails(BranchingPolicy):
    """Right (it can add) when A is even; when A is odd it only subtracts, so those problems
    stay unsolved however long the search."""

    def _candidates(self, prompt):
        runs, fails = super()._candidates(prompt)
        if numbers(prompt)[0] % 2:
            runs = [r for r in runs if " - " in r] or runs
        return runs, fails


def problems() -> list[Problem]:
    pairs = [(12, 30), (13, 30), (20, 41), (27, 11), (40, 2), (55, 5)]
    return [
        Problem(id=f"add:{i}", question=f"What is {a} + {b}?", answer=str(a + b))
        for i, (a, b) in enumerate(pairs)
    ]


def quick(**evolve_fields):
    cfg = load_config("quick")
    rounds = [
        {"preset": "round2", "rollouts": 2, "num_samples": 3},
        {"preset": "round2", "rollouts": 2, "num_samples": 3},
        {"preset": "round3", "rollouts": 2, "num_samples": 3},
        {"preset": "round4", "rollouts": 2, "num_samples": 3},
    ]
    return dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, rounds=rounds, **evolve_fields))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    evolve.write_problems(tmp_path / "problems" / "train.jsonl", problems())
    return tmp_path


@pytest.fixture
def backends_seen(monkeypatch, sandbox, grader):
    """Replaces open_backends: records the config each stage opens its models with and hands
    out the scripted policy (and a constant reward model where a PPM is named)."""
    seen = []
    # Modules that bind open_backends by name at import: imported before the patch, or one
    # first imported under it would keep the fake for the rest of the session.
    import rstar.search.run  # noqa: F401
    import rstar.search.solve  # noqa: F401

    @contextlib.contextmanager
    def fake(cfg, policy=None, reward=None, need_grader=True):
        seen.append(cfg)
        yield Backends(
            policy=OddFails(depth=1, valid=1, wrong=1),
            sandbox=sandbox,
            grader=grader,
            reward=TableReward(default=0.1) if cfg.model.ppm else None,
        )

    monkeypatch.setattr("rstar.search.jobs.open_backends", fake)
    return seen


def keys(path: Path) -> list[str]:
    return sorted(r["key"] for r in iter_records(path))


def test_round4_searches_unsolved_problems_again_in_extra_passes(run_dir, backends_seen):
    cfg = quick(unsolved_rollouts=[3, 2], unsolved_seeds=2)
    evolve.generate_round(cfg, run_dir, 4, "policy-r3", "")
    odd = [p.id for p in problems() if numbers(p.question)[0] % 2]
    even = [p.id for p in problems() if p.id not in odd]
    recs = list(iter_records(run_dir / "round4" / "trees.jsonl"))
    assert sorted(r["key"] for r in recs) == sorted(f"{p.id}#0" for p in problems())
    assert {r["problem"]["id"] for r in recs if r["correct"]} == set(even)
    # each pass: the problems still unsolved, unsolved_seeds trees each, its own rollouts and seed
    base_seed = evolve.round_config(cfg, 4).search.seed
    for i, rollouts in enumerate([3, 2], start=1):
        extra = list(iter_records(run_dir / "round4" / f"extra{i}" / "trees.jsonl"))
        assert sorted(r["key"] for r in extra) == sorted(f"{pid}#{k}" for pid in odd for k in (0, 1))
        assert all(r["config"]["search"]["rollouts"] == rollouts for r in extra)
        assert all(r["config"]["search"]["seed"] == base_seed + i for r in extra)
        assert not any(r["correct"] for r in extra)
    assert not (run_dir / "round4" / "extra3").exists()
    # the run's records, as extract reads them, include the passes
    from rstar.search.treefile import run_records

    assert len(list(run_records(run_dir / "round4"))) == len(problems()) + 2 * 2 * len(odd)


def test_no_extra_pass_once_everything_is_solved(run_dir, backends_seen):
    evolve.write_problems(
        run_dir / "problems" / "train.jsonl", [p for p in problems() if numbers(p.question)[0] % 2 == 0]
    )
    evolve.generate_round(quick(unsolved_rollouts=[3, 2]), run_dir, 4, "policy-r3", "")
    assert not (run_dir / "round4" / "extra1").exists()


def test_a_ppm_round_without_a_ppm_searches_terminal_guided(run_dir, backends_seen):
    cfg = quick()
    assert evolve.round_config(cfg, 3).search.ppm_init  # round 3's preset initialises q by the PPM
    evolve.generate_round(cfg, run_dir, 3, "policy-r2", "")
    [used] = backends_seen
    assert not used.search.ppm_init and used.model.ppm == "" and used.model.policy == "policy-r2"
    # with a PPM it is used, and every node of the trees carries its value
    (run_dir / "with" / "problems").mkdir(parents=True)
    evolve.write_problems(run_dir / "with" / "problems" / "train.jsonl", problems()[:2])
    evolve.generate_round(cfg, run_dir / "with", 3, "policy-r2", "models/ppm_r2")
    used = backends_seen[-1]
    assert used.search.ppm_init and used.model.ppm == "models/ppm_r2"
    for rec in iter_records(run_dir / "with" / "round3" / "trees.jsonl"):
        assert all(n["value"] == 0.1 for n in rec["tree"]["nodes"][1:])
    # a round whose preset does not use a PPM is not given one
    evolve.generate_round(cfg, run_dir / "with", 2, "policy-r1", "models/ppm_r1")
    assert backends_seen[-1].model.ppm == ""


@pytest.fixture
def training_calls(monkeypatch):
    calls: dict[str, list] = {"sft": [], "ppm": [], "configs": []}

    def sft(data, init, out, cfg, **kw):
        calls["sft"].append((Path(data).name, str(init), Path(out).name))
        calls["configs"].append(("sft", cfg))
        return {"train_loss": 1.0, "steps": 1}

    def reward(pairs, init, out, cfg, kind="ppm", **kw):
        calls["ppm"].append(([p["prompt"] for p in pairs], Path(init).name, Path(out).name, kind))
        calls["configs"].append(("ppm", cfg))
        return {"heldout_accuracy": 1.0, "eval_records": 1, "steps": 1}

    monkeypatch.setattr("rstar.training.sft.train_sft", sft)
    monkeypatch.setattr("rstar.training.reward.train_reward", reward)
    return calls


def write_pairs(run: Path, per_round: dict[int, int]) -> None:
    for q, n in per_round.items():
        (run / f"round{q}").mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"r{q}p{i}", "pos": "a", "neg": "b"} for i in range(n)]
        (run / f"round{q}" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    "rounds, want",
    [(1, ["r4p0", "r4p1"]), (2, ["r3p0", "r4p0", "r4p1"]), (0, ["r1p0", "r3p0", "r4p0", "r4p1"])],
)
def test_the_ppm_trains_on_the_pairs_of_ppm_pair_rounds_rounds(tmp_path, training_calls, rounds, want):
    write_pairs(tmp_path, {1: 1, 2: 0, 3: 1, 4: 2})
    out = evolve.train_round(quick(ppm_pair_rounds=rounds), tmp_path, 4, "base-dir", "models/policy_r3")
    [(prompts, init, dest, kind)] = training_calls["ppm"]
    assert prompts == want and out["ppm"]["pairs"] == len(want)
    # the PPM starts from this round's fine-tuned policy
    assert (init, dest, kind) == ("policy_r4", "ppm_r4", "ppm")


def test_no_pairs_no_ppm(tmp_path, training_calls):
    write_pairs(tmp_path, {1: 3, 2: 0})
    out = evolve.train_round(
        quick(ppm_pair_rounds=1, sft_init="base"), tmp_path, 2, "base-dir", "models/policy_r1"
    )
    assert out["ppm"] == {"skipped": "no preference pairs"} and training_calls["ppm"] == []
    assert training_calls["sft"] == [("sft.jsonl", "base-dir", "policy_r2")]


@pytest.mark.parametrize("sft_init, want", [("base", "base-dir"), ("previous", "models/policy_r2")])
def test_each_round_fine_tunes_from_sft_init(tmp_path, training_calls, sft_init, want):
    write_pairs(tmp_path, {1: 1, 2: 1, 3: 1})
    evolve.train_round(quick(sft_init=sft_init), tmp_path, 3, "base-dir", "models/policy_r2")
    assert training_calls["sft"] == [("sft.jsonl", want, "policy_r3")]


def test_a_rounds_sft_and_ppm_entries_override_its_training_only(tmp_path, training_calls):
    write_pairs(tmp_path, {1: 1, 2: 1, 3: 1, 4: 1})
    cfg = quick()
    rounds = [
        *cfg.evolve.rounds[:3],
        {**cfg.evolve.rounds[3], "sft": {"epochs": 7}, "ppm": {"eval_fraction": 0.3}},
    ]
    cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, rounds=rounds))
    assert cfg.sft.epochs != 7 and cfg.ppm.eval_fraction != 0.3
    evolve.train_round(cfg, tmp_path, 3, "base-dir", "models/policy_r2")
    evolve.train_round(cfg, tmp_path, 4, "base-dir", "models/policy_r3")
    (_, sft3), (_, ppm3), (_, sft4), (_, ppm4) = training_calls["configs"]
    assert (sft3, ppm3) == (cfg.sft, cfg.ppm)
    # round 4's own fields change; the rest of each section is the run's
    assert sft4 == dataclasses.replace(cfg.sft, epochs=7.0)
    assert ppm4 == dataclasses.replace(cfg.ppm, eval_fraction=0.3)
    assert evolve.round_config(cfg, 4).search == evolve.round_config(quick(), 4).search


@pytest.mark.parametrize(
    "entry, names",
    [({"sft": {"epoch": 2}}, "evolve.rounds[1].sft.epoch"), ({"ppm": 2}, "evolve.rounds[1].ppm")],
)
def test_a_bad_round_entry_fails_before_the_run_starts(tmp_path, entry, names):
    cfg = quick()
    rounds = [cfg.evolve.rounds[0], {**cfg.evolve.rounds[1], **entry}, *cfg.evolve.rounds[2:]]
    run = tmp_path / "run"
    cfg = dataclasses.replace(cfg, evolve=dataclasses.replace(cfg.evolve, rounds=rounds, run_dir=str(run)))
    with pytest.raises(ConfigError, match=re.escape(names)):
        evolve.evolve(cfg)
    assert not run.exists()  # nothing was written


def run_loop(tmp_path, monkeypatch, **fields) -> list[tuple]:
    """evolve.evolve with every stage recorded, not run: rounds 1 and 3 train no PPM."""
    calls = []
    run = tmp_path / "run"

    def stage(name):
        def fn(cfg, run_, r, *args):
            calls.append((name, r, *[Path(a).name if a else a for a in args]))
            if name == "train":
                return {"ppm": {"skipped": "no preference pairs"} if r in (1, 3) else {"pairs": 1}}
            return {}

        return fn

    for name in ("generate", "extract", "train"):
        monkeypatch.setattr(evolve, f"{name}_round", stage(name))
    monkeypatch.setattr(evolve, "evaluate_round", stage("eval"))
    monkeypatch.setattr(evolve, "prepare_problems", lambda cfg, run_: {})
    monkeypatch.setattr("rstar.report.write_report", lambda *a, **k: {})
    evolve.evolve(quick(base_policy=str(tmp_path / "base"), run_dir=str(run), compare_size="", **fields))
    return calls


def test_a_round_without_a_ppm_leaves_the_previous_one_in_use(tmp_path, monkeypatch):
    """The loop: each round searches with the last PPM trained (none before round 2), and its
    policy is the previous round's; a round that trains no PPM keeps the one before."""
    calls = run_loop(tmp_path, monkeypatch)
    gen = [c for c in calls if c[0] == "generate"]
    assert gen == [
        ("generate", 1, "base", ""),
        ("generate", 2, "policy_r1", ""),  # round 1 trained no PPM
        ("generate", 3, "policy_r2", "ppm_r2"),
        ("generate", 4, "policy_r3", "ppm_r2"),  # round 3 trained none: round 2's carries on
    ]
    evals = [c for c in calls if c[0] == "eval"]
    assert evals[0] == ("eval", 0, "base", "")
    assert evals[1:] == [
        ("eval", 1, "policy_r1", ""),
        ("eval", 2, "policy_r2", "ppm_r2"),
        ("eval", 3, "policy_r3", "ppm_r2"),
        ("eval", 4, "policy_r4", "ppm_r4"),
    ]
    trains = [c for c in calls if c[0] == "train"]
    assert [c[2:] for c in trains] == [
        ("base", "base"),
        ("base", "policy_r1"),
        ("base", "policy_r2"),
        ("base", "policy_r3"),
    ]


def test_round_pairs_use_the_configured_pair_filters(run_dir, backends_seen):
    """extract_round hands evolve.pair_min_margin / pair_min_edit_distance to the PPM extraction:
    filters off keep every pair the trees hold, a filter no pair passes keeps none."""
    from rstar.data.extract import extract_ppm
    from rstar.search.treefile import run_records

    cfg = quick()
    evolve.generate_round(cfg, run_dir, 2, "policy-r1", "")
    unfiltered = extract_ppm(run_records(run_dir / "round2"), min_margin=0, min_edit_distance=0)
    assert unfiltered  # the scripted trees hold right and wrong siblings

    def pairs(**fields) -> list[dict]:
        out = evolve.extract_round(quick(**fields), run_dir, 2)
        rows = [json.loads(x) for x in (run_dir / "round2" / "pairs.jsonl").read_text().splitlines()]
        assert out["pairs"] == len(rows)
        return rows

    assert pairs(pair_min_margin=0, pair_min_edit_distance=0) == unfiltered
    assert pairs(pair_min_margin=0, pair_min_edit_distance=10_000) == []
    assert pairs(pair_min_margin=5, pair_min_edit_distance=0) == []  # Q margins are at most 2


@pytest.mark.parametrize("reward_kind", ["ppm", "implicit"])
def test_each_round_trains_the_reward_kind_configured(tmp_path, training_calls, reward_kind):
    write_pairs(tmp_path, {1: 2})
    evolve.train_round(quick(reward_kind=reward_kind), tmp_path, 1, "base-dir", "base-dir")
    [(_, init, dest, kind)] = training_calls["ppm"]
    assert (init, dest, kind) == ("policy_r1", "ppm_r1", reward_kind)


class GreedyKnowsSmall(OddFails):
    """Greedy decoding (temperature 0) is right exactly when A < 20; sampling is OddFails."""

    def generate(self, requests):
        out = super().generate(requests)
        for r, comps in zip(requests, out):
            a, b, k, done = self.position(r.prompt)
            if r.temperature == 0 and done is None and k < self.depth:
                code = f"x = {a} + {b}" if a < 20 else f"x = {a} - {b}"
                comps[:] = [Completion(text=self.step(k, code, "greedy"), stop_reason="stop", n_tokens=4)]
        return out


def test_frontier_searches_only_what_greedy_decoding_gets_wrong(run_dir, monkeypatch, sandbox, grader):
    """evolve.frontier: a greedy pass over the round's problems first; the search takes the
    rest; greedy solutions count for coverage and stay out of the SFT set."""
    policy = GreedyKnowsSmall(depth=1, valid=1, wrong=1)

    @contextlib.contextmanager
    def fake(cfg, policy_=None, reward=None, need_grader=True):
        yield Backends(policy=policy, sandbox=sandbox, grader=grader, reward=None)

    import rstar.search.run  # noqa: F401

    monkeypatch.setattr("rstar.search.jobs.open_backends", fake)
    cfg = quick(frontier=True, sft_seed_records=0, unsolved_rollouts=[])
    evolve.generate_round(cfg, run_dir, 2, "policy-r1", "")
    small = {p.id for p in problems() if numbers(p.question)[0] < 20}  # 12 + 30, 13 + 30
    greedy = list(iter_records(run_dir / "round2" / "greedy" / "trees.jsonl"))
    assert sorted(r["key"] for r in greedy) == sorted(f"{p.id}#0" for p in problems())
    assert {r["problem"]["id"] for r in greedy if r["correct"]} == small
    assert keys(run_dir / "round2" / "trees.jsonl") == sorted(
        f"{p.id}#0" for p in problems() if p.id not in small
    )
    out = evolve.extract_round(cfg, run_dir, 2)
    even = {p.id for p in problems() if numbers(p.question)[0] % 2 == 0}
    assert out["coverage"]["covered"] == len(small | even) == 4  # 13 + 30 by greedy decoding only
    sft = [json.loads(x) for x in (run_dir / "round2" / "sft.jsonl").read_text().splitlines()]
    questions = {p.question: p.id for p in problems()}
    assert sft and {questions[q] for q in questions for rec in sft if q in json.dumps(rec)} == even - small
    # without frontier every problem is searched and no greedy pass runs
    (run_dir / "off" / "problems").mkdir(parents=True)
    evolve.write_problems(run_dir / "off" / "problems" / "train.jsonl", problems())
    evolve.generate_round(quick(), run_dir / "off", 2, "policy-r1", "")
    assert not (run_dir / "off" / "round2" / "greedy").exists()
    assert len(keys(run_dir / "off" / "round2" / "trees.jsonl")) == len(problems())


def test_fresh_problems_give_each_round_its_own_world_problems(tmp_path):
    """evolve.fresh_problems on the embedded world: round r's file holds the r-th block of
    train_per_level problems of each level, no question in two rounds, round 1's block is the
    pool a run without the setting searches, and no seed solution is of a searched question."""
    from rstar.data.problems import load_problems

    same = quick()
    fresh = quick(fresh_problems=True)
    out = evolve.prepare_problems(fresh, tmp_path / "fresh")
    evolve.prepare_problems(same, tmp_path / "same")
    pdir = tmp_path / "fresh" / "problems"
    shares = [load_problems(pdir / f"train_r{r}.jsonl") for r in range(1, 5)]
    assert out["train_per_round"] == [16] * 4 and out["train"] == 64
    for share in shares:
        levels = [p.level for p in share]
        assert [levels.count(str(lv)) for lv in (1, 2, 3, 4)] == same.evolve.train_per_level
    questions = [p.question for share in shares for p in share]
    assert len(set(questions)) == len(questions) == 64
    assert sorted(questions) == sorted(p.question for p in load_problems(pdir / "train.jsonl"))
    pool = load_problems(tmp_path / "same" / "problems" / "train.jsonl")
    assert [p.question for p in shares[0]] == [p.question for p in pool]
    assert [p.question for p in shares[1]] != [p.question for p in pool]
    seeds = (pdir / "seed_sft.jsonl").read_text()
    assert not any(json.dumps(q)[1:-1] in seeds for q in questions)
    assert load_problems(pdir / "test.jsonl") == load_problems(tmp_path / "same" / "problems" / "test.jsonl")


def test_fresh_problems_rounds_search_and_count_their_own_share(tmp_path, backends_seen):
    """A problem file under evolve.fresh_problems: cut into one share per round (6 problems, 4
    rounds: 2, 2, 1, 1); a round's search and its coverage take its share only."""
    train = tmp_path / "train.jsonl"
    one_step = "<code>\nx = 1\n<end_of_step>\nprint(x)\n<end_of_code>"  # for coverage_by_steps
    evolve.write_problems(train, [dataclasses.replace(p, meta={"solution": one_step}) for p in problems()])
    cfg = quick(fresh_problems=True, train_problems=str(train), sft_seed_records=0, unsolved_rollouts=[])
    run = tmp_path / "run"
    assert evolve.prepare_problems(cfg, run)["train_per_round"] == [2, 2, 1, 1]
    evolve.generate_round(cfg, run, 2, "policy-r1", "")
    share = [p.id for p in problems()[2:4]]  # 20 + 41 (even: solved), 27 + 11 (odd: unsolved)
    assert keys(run / "round2" / "trees.jsonl") == sorted(f"{pid}#0" for pid in share)
    out = evolve.extract_round(cfg, run, 2)
    assert (out["coverage"]["problems"], out["coverage"]["covered"]) == (2, 1)
    assert out["coverage_by_steps"] == {"1": {"problems": 2, "covered": 1, "coverage": 0.5}}
    # too few problems for the rounds, and a run whose problems were written without the setting
    with pytest.raises(evolve.RstarError, match="evolve.fresh_problems: 3 training problems"):
        evolve.round_shares(problems()[:3], 4)
    evolve.prepare_problems(quick(train_problems=str(train)), tmp_path / "old")
    with pytest.raises(evolve.RstarError, match="train_r2.jsonl is missing"):
        evolve.generate_round(cfg, tmp_path / "old", 2, "policy-r1", "")


def test_the_searches_of_the_test_evaluation_can_wait_for_the_last_round(tmp_path, monkeypatch):
    """evolve.eval_search_each_round=false: rounds 1-3 are evaluated greedily only (no reward
    model handed to the evaluation), the last round with the searches and its PPM."""
    calls = run_loop(tmp_path, monkeypatch, eval_search_each_round=False)
    assert [c for c in calls if c[0] == "eval"] == [
        ("eval", 0, "base", ""),
        ("eval", 1, "policy_r1", ""),
        ("eval", 2, "policy_r2", ""),
        ("eval", 3, "policy_r3", ""),
        ("eval", 4, "policy_r4", "ppm_r4"),
    ]
