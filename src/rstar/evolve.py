"""`rstar evolve`: the paper's four rounds of self-evolution (section 3.4), end to end.

    round r:  generate (MCTS with policy r-1 [+ PPM r-1 from round 3]) -> trees
              extract  (top-2 correct trajectories; per-step preference pairs)
              train    policy r (SFT)  and  PPM r (pairwise, from policy r)
              evaluate (test split: greedy, best-of-N + PPM, MCTS + PPM at equal samples)

With no arguments it runs the embedded preset: a synthetic math world and a tiny Qwen2 built
and pre-trained here (rstar.data.world, rstar.models.tiny), so the whole loop runs on a CPU.
With `--config FILE` the same code runs any policy and problem files (a GPU user's
Qwen2.5-Math-7B with vLLM is the same command).

The bootstrap. The paper's round 1 uses a 236B model. The embedded default has no larger
model, so round 1 runs the seed-trained base policy with a larger rollout budget: the point
of round 1 is to get correct trajectories for as many problems as possible, and more search
is the stand-in for more capacity. `evolve.bootstrap_policy` names a real larger model when
there is one; it runs through the same search as every other policy.

Every stage is resumable: a stage records itself in `RUN/state.json` when it finishes and is
skipped on the next run; `generate` stages resume inside the tree file (problem by problem),
so a killed run continues at the stage and problem where it stopped. Artifacts:

    RUN/problems/{train,test,seed_sft}.jsonl (+ train_rK.jsonl, evolve.fresh_problems)
    RUN/models/{base,policy_rK,ppm_rK}/
    RUN/roundK/{trees.jsonl, extra*/, greedy/ (evolve.frontier), sft.jsonl, pairs.jsonl, eval/}
    RUN/report.{md,json,png}, RUN/trees.html    RUN/state.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rstar import RstarError
from rstar.config import Config, add_config_arguments, config_from_args, from_dict, preset_dict
from rstar.lock import writes_to


def log(msg: str) -> None:
    print(f"[evolve] {msg}", file=sys.stderr, flush=True)


# --- run state ------------------------------------------------------------------------------


class RunState:
    """Which stages of a run are done (and how long they took), kept in RUN/state.json."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.path = run_dir / "state.json"
        stray = sorted(
            q.name
            for q in run_dir.glob("*")
            if q.name in ("problems", "models") or q.name.startswith("round")
        )
        if stray and not self.path.exists():
            # Without state.json nothing says these belong to this run; resuming their tree
            # files would mix another run's searches (other models, other config) into this one.
            raise RstarError(
                f"{run_dir} holds run artifacts ({', '.join(stray)}) but no state.json: they are not "
                "from a run this command can resume; pick another --run-dir or empty this one"
            )
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise RstarError(
                    f"{self.path}: corrupt, not JSON ({e}): restore it, or pick another --run-dir"
                ) from e
            if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
                raise RstarError(
                    f"{self.path}: not a run state (no 'stages' mapping): pick another --run-dir"
                )
            if self.data.get("config") != cfg.to_dict():
                log(f"note: {self.path} was written with another config; finished stages are kept")
        else:
            self.data = {"stages": {}}
        self.data["config"] = cfg.to_dict()
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)  # atomic: a kill never leaves a half-written state

    def done(self, name: str) -> bool:
        return name in self.data["stages"]

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run stage `name` (= fn(*args)) unless it already finished; record its time and result."""
        if self.done(name):
            log(f"{name}: done earlier, skipped")
            return self.data["stages"][name].get("result")
        log(f"{name} ...")
        earlier = self._earlier_attempts(name)
        self.data["running"] = {"stage": name, "started": time.time(), "earlier_s": earlier}
        self._save()
        t0 = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - t0 + earlier
        entry = {"seconds": round(seconds, 2), "result": result}
        if earlier:  # the report adds up every attempt and says the stage was resumed
            entry.update(resumed=True, earlier_attempts_s=round(earlier, 2))
        self.data["stages"][name] = entry
        self.data.pop("running", None)
        self._save()
        log(f"{name}: {seconds:.1f} s" + (f" (with {earlier:.1f} s of earlier attempts)" if earlier else ""))
        return result

    def _earlier_attempts(self, name: str) -> float:
        """Seconds that stopped attempts at stage `name` spent: from their start to the last
        file they wrote in the run directory (a kill leaves no end time)."""
        running = self.data.get("running")
        if not isinstance(running, dict) or running.get("stage") != name:
            return 0.0
        last = float(running.get("started", 0.0))
        for root, _dirs, names in os.walk(self.path.parent):
            for n in names:
                if n not in ("state.json", "state.tmp", ".rstar.lock"):
                    with contextlib.suppress(OSError):
                        last = max(last, os.path.getmtime(os.path.join(root, n)))
        return max(0.0, last - float(running.get("started", last))) + float(running.get("earlier_s", 0.0))

    def seconds(self, prefix: str) -> float:
        return sum(v["seconds"] for k, v in self.data["stages"].items() if k.startswith(prefix))


# --- stages ---------------------------------------------------------------------------------


def round_config(cfg: Config, r: int) -> Config:
    """The config of round r: the round's preset search section, then its search overrides;
    an `sft` or `ppm` mapping in the round's entry overrides that training section for this
    round only (e.g. {preset: round4, sft: {epochs: 2}})."""
    spec = dict(cfg.evolve.rounds[r - 1])
    where = f"evolve.rounds[{r - 1}]."
    train = {section: spec.pop(section) for section in ("sft", "ppm") if section in spec}
    preset = spec.pop("preset", None)
    fields = dict(preset_dict(preset).get("search", {})) if preset else {}
    fields.update(spec)
    search = from_dict(type(cfg.search), fields, where=where, base=cfg.search)
    # the training sections as nested config sections: from_dict names a bad field or value
    return from_dict(type(cfg), train, where=where, base=dataclasses.replace(cfg, search=search))


def write_problems(path: Path, problems: list) -> None:
    from rstar.data.extract import write_records

    write_records([p.to_dict() for p in problems], path)


def round_shares(problems: list, rounds: int) -> list[list]:
    """evolve.fresh_problems: the training problems cut into one share per round, each level's
    problems (in file order) into `rounds` consecutive blocks of near-equal size, so every round
    searches the same mix of levels and no problem twice."""
    if len(problems) < rounds:
        raise RstarError(
            f"evolve.fresh_problems: {len(problems)} training problems cannot give each of {rounds} rounds its own"
        )
    levels: dict[object, list] = {}
    for p in problems:
        levels.setdefault(p.level, []).append(p)
    shares: list[list] = [[] for _ in range(rounds)]
    for group in levels.values():
        size, extra = divmod(len(group), rounds)
        start = 0
        for r in range(rounds):
            end = start + size + (r < extra)
            shares[r] += group[start:end]
            start = end
    return shares


def round_problems_path(cfg: Config, run: Path, r: int) -> Path:
    """The file of the problems round r searches: its own share under evolve.fresh_problems,
    else the run's whole training set."""
    pdir = run / "problems"
    if not cfg.evolve.fresh_problems:
        return pdir / "train.jsonl"
    path = pdir / f"train_r{r}.jsonl"
    if not path.exists():
        raise RstarError(
            f"{path} is missing: this run's problems were written without evolve.fresh_problems; "
            "resume it with the setting it started with, or start another --run-dir"
        )
    return path


def prepare_problems(cfg: Config, run: Path) -> dict:
    """Training and test problems (and, for the embedded world, the seed SFT set); with
    evolve.fresh_problems also each round's share of the training problems."""
    from rstar.data.problems import load_problems

    e = cfg.evolve
    pdir = run / "problems"
    seed = None
    if e.train_problems:
        train = load_problems(e.train_problems)
        test = load_problems(e.test_problems) if e.test_problems else []
    else:
        from rstar.data.world import world_sets

        train, test, seed = world_sets(e)
    write_problems(pdir / "train.jsonl", train)
    write_problems(pdir / "test.jsonl", test)
    out = {"train": len(train), "test": len(test)}
    if e.fresh_problems:
        shares = round_shares(train, len(e.rounds))
        for r, share in enumerate(shares, start=1):
            write_problems(pdir / f"train_r{r}.jsonl", share)
        out["train_per_round"] = [len(s) for s in shares]
    if seed is not None:
        from rstar.data.extract import write_records

        write_records(seed, pdir / "seed_sft.jsonl")
        out["seed_sft"] = len(seed)
    return out


def build_base(cfg: Config, run: Path, size: str, name: str) -> dict:
    """A tiny policy (tokenizer trained on the world's text) pre-trained on the run's seed set:
    `rstar model tiny --pretrain`'s recipe, so a policy that command pre-trained with the same
    settings is the same model (`pretrain_tiny` keeps it)."""
    from rstar.models.tiny import pretrain_tiny

    seed = [json.loads(x) for x in (run / "problems" / "seed_sft.jsonl").read_text().splitlines()]
    metrics = pretrain_tiny(run / "models" / name, cfg, size=size, records=seed, device="auto")
    return {k: metrics[k] for k in ("train_loss", "eval_loss", "steps", "train_seconds") if k in metrics}


def greedy_pass_dir(run: Path, r: int) -> Path:
    """Where round r's greedy pass (evolve.frontier) writes its tree file."""
    return run / f"round{r}" / "greedy"


def generate_round(cfg: Config, run: Path, r: int, policy: str, ppm: str) -> dict:
    from rstar.data.extract import solved_ids
    from rstar.data.problems import load_problems
    from rstar.search.jobs import open_backends
    from rstar.search.run import generate
    from rstar.search.treefile import iter_records, run_records

    rcfg = round_config(cfg, r)
    if rcfg.search.ppm_init and not ppm:
        log(f"round {r}: no PPM trained yet, so this round's search is terminal-guided only")
        rcfg = dataclasses.replace(rcfg, search=dataclasses.replace(rcfg.search, ppm_init=False))
    rcfg = dataclasses.replace(
        rcfg, model=dataclasses.replace(rcfg.model, policy=policy, ppm=ppm if rcfg.search.ppm_init else "")
    )
    problems = load_problems(round_problems_path(cfg, run, r))
    # With search actors each actor opens its own backends; the searches and their trees are the
    # same (seeded requests), only spread over processes. A small prefetch keeps the last
    # searches of a round from waiting in one actor's queue while the other has none.
    ray = None
    if cfg.evolve.search_actors > 0:
        from rstar.search.ray_runner import RayOptions

        ray = RayOptions(actors=cfg.evolve.search_actors, prefetch=8)
    with contextlib.nullcontext() if ray else open_backends(rcfg) as backends:
        if cfg.evolve.frontier:
            # Greedy decoding first: the search budget goes to the problems it gets wrong.
            greedy = dataclasses.replace(rcfg.search, mode="greedy", trajectories=1)
            generate(
                problems,
                dataclasses.replace(rcfg, search=greedy),
                greedy_pass_dir(run, r),
                resume=True,
                backends=backends,
                description=f"round {r} greedy pass",
                ray=ray,
            )
            easy = solved_ids(iter_records(greedy_pass_dir(run, r) / "trees.jsonl"))
            problems = [p for p in problems if p.id not in easy]
            log(
                f"round {r}: greedy decoding solves {len(easy)} training problems; searching the other {len(problems)}"
            )
        stats = generate(
            problems,
            rcfg,
            run / f"round{r}",
            resume=True,
            backends=backends,
            description=f"round {r} search",
            ray=ray,
        )
        if r == len(cfg.evolve.rounds):
            # Round 4: problems still unsolved get more rollouts and several trees each.
            for i, rollouts in enumerate(cfg.evolve.unsolved_rollouts):
                solved = solved_ids(run_records(run / f"round{r}"))  # read once, not once per problem
                unsolved = [p for p in problems if p.id not in solved]
                if not unsolved:
                    break
                extra = dataclasses.replace(
                    rcfg.search,
                    rollouts=rollouts,
                    trajectories=cfg.evolve.unsolved_seeds,
                    seed=rcfg.search.seed + 1 + i,
                )
                log(
                    f"round {r}: {len(unsolved)} unsolved problems, {rollouts} rollouts x {extra.trajectories} seeds"
                )
                generate(
                    unsolved,
                    dataclasses.replace(rcfg, search=extra),
                    run / f"round{r}" / f"extra{i + 1}",
                    resume=True,
                    backends=backends,
                    description=f"round {r} unsolved, pass {i + 1}",
                    ray=ray,
                )
    return stats.as_dict()


def extract_round(cfg: Config, run: Path, r: int) -> dict:
    from rstar.data.extract import coverage, coverage_by_steps, extract_ppm, extract_sft, solved_ids
    from rstar.data.problems import load_problems
    from rstar.search.treefile import iter_records, run_records

    recs = run_records(run / f"round{r}")
    # The round's own trajectories, `sft_repeat` times over: beside thousands of seed
    # solutions a few hundred new ones are too small a share to move the policy.
    sft = extract_sft(recs) * cfg.evolve.sft_repeat
    pairs = extract_ppm(
        recs, min_margin=cfg.evolve.pair_min_margin, min_edit_distance=cfg.evolve.pair_min_edit_distance
    )
    seed_path = run / "problems" / "seed_sft.jsonl"
    keep = cfg.evolve.sft_seed_records
    if keep and seed_path.exists():
        seed = [json.loads(line) for line in seed_path.read_text().splitlines() if line.strip()]
        # The same sample every round (and on resume): a fixed stride, not a random draw.
        sft += seed if keep < 0 or keep >= len(seed) else seed[:: len(seed) // keep][:keep]
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        with open(run / f"round{r}" / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    # With evolve.frontier, the problems greedy decoding solved count as covered (the policy
    # found a correct trajectory), but their trajectories stay out of the SFT set and pairs.
    greedy = greedy_pass_dir(run, r) / "trees.jsonl"
    covered = recs + (list(iter_records(greedy)) if greedy.exists() else [])
    by_steps = coverage_by_steps(load_problems(round_problems_path(cfg, run, r)), solved_ids(covered))
    return {
        "coverage": coverage(covered),
        "coverage_by_steps": by_steps,
        "sft_records": len(sft),
        "pairs": len(pairs),
    }


def train_round(cfg: Config, run: Path, r: int, base: str, previous: str) -> dict:
    from rstar.training.reward import train_reward
    from rstar.training.sft import train_sft

    models = run / "models"
    rcfg = round_config(cfg, r)
    init = base if cfg.evolve.sft_init == "base" else previous
    sft = train_sft(run / f"round{r}" / "sft.jsonl", init, models / f"policy_r{r}", rcfg.sft)
    keep = ("train_loss", "eval_loss", "heldout_accuracy", "steps", "train_seconds")
    out = {"sft": {k: sft[k] for k in keep if k in sft}}
    n = cfg.evolve.ppm_pair_rounds
    pairs = [
        json.loads(line)
        for q in range(1 if n <= 0 else max(1, r - n + 1), r + 1)
        for line in (run / f"round{q}" / "pairs.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if not pairs:
        # Pairs need a node with both a correct and a wrong continuation; a round that solved
        # (almost) nothing has none. The next round then searches with the previous PPM.
        log(f"round {r}: no preference pairs (too few problems solved); no PPM is trained this round")
        out["ppm"] = {"skipped": "no preference pairs"}
        return out
    ppm = train_reward(
        pairs, models / f"policy_r{r}", models / f"ppm_r{r}", rcfg.ppm, kind=cfg.evolve.reward_kind
    )
    out["ppm"] = {k: ppm[k] for k in keep if k in ppm} | {
        "pairs": len(pairs),
        "heldout_pairs": ppm["eval_records"],
    }
    return out


def evaluate_round(cfg: Config, run: Path, r: int | str, policy: str, ppm: str) -> dict:
    """Greedy, best-of-N + PPM and MCTS + PPM on the test split, at N = eval_samples complete
    solutions each (MCTS: one search of N rollouts; best-of-N: N sampled solutions)."""
    from rstar.data.problems import load_problems
    from rstar.evaluate import EvalRun, run_eval

    problems = load_problems(run / "problems" / "test.jsonl")
    if not problems:
        return {}
    ecfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=policy))
    runs = [EvalRun("greedy", "greedy")]
    if ppm:
        runs += [EvalRun("bon-ppm", "bon", ppm), EvalRun("mcts-ppm", "mcts", ppm)]
    n = cfg.evolve.eval_samples
    budgets = sorted({1, *[k for k in (2, 4, 8, 16, 32, 64) if k < n], n})
    summary = run_eval(
        problems,
        ecfg,
        runs,
        budgets,
        run / f"round{r}" / "eval",
        top_k=cfg.evolve.eval_top_k,
        resume=True,
        mcts_unit="rollouts",
    )
    return summary


# --- the loop -------------------------------------------------------------------------------


@writes_to(lambda cfg: cfg.evolve.run_dir, "--run-dir")
def evolve(cfg: Config) -> dict:
    from rstar.models import set_cpu_threads

    set_cpu_threads(cfg.model)  # training runs in this process too
    for r in range(1, len(cfg.evolve.rounds) + 1):
        round_config(cfg, r)  # a bad round entry fails now, not hours into the run
    run = Path(cfg.evolve.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state = RunState(run, cfg)
    t0 = time.perf_counter()
    state.run("problems", prepare_problems, cfg, run)
    e = cfg.evolve
    if e.base_policy:
        base = e.base_policy
    else:
        if not (run / "problems" / "seed_sft.jsonl").exists():
            raise RstarError(
                "evolve.base_policy is empty, but there is no seed set to pre-train a tiny policy on "
                "(set evolve.base_policy when evolve.train_problems is set)"
            )
        state.run("pretrain", build_base, cfg, run, e.policy_size, "base")
        base = str(run / "models" / "base")
    if e.compare_size and not e.base_policy:
        state.run("pretrain_compare", build_base, cfg, run, e.compare_size, "compare")
        state.run("eval_compare", evaluate_round, cfg, run, "compare", str(run / "models" / "compare"), "")
    state.run("eval_base", evaluate_round, cfg, run, 0, base, "")
    policy, ppm = e.bootstrap_policy or base, ""
    for r in range(1, len(e.rounds) + 1):
        state.run(f"round{r}/generate", generate_round, cfg, run, r, policy, ppm)
        state.run(f"round{r}/extract", extract_round, cfg, run, r)
        trained = state.run(f"round{r}/train", train_round, cfg, run, r, base, policy if r > 1 else base)
        policy = str(run / "models" / f"policy_r{r}")
        if "skipped" not in trained["ppm"]:  # else the previous round's PPM stays in use
            ppm = str(run / "models" / f"ppm_r{r}")
        searched = e.eval_search_each_round or r == len(e.rounds)
        state.run(f"round{r}/eval", evaluate_round, cfg, run, r, policy, ppm if searched else "")
    from rstar.report import write_report

    report = write_report(run, state.data, total_s=time.perf_counter() - t0)
    return report


# --- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="run directory (sets evolve.run_dir)")
    parser.add_argument(
        "--quick", action="store_true", help="the quick preset (a smoke run of every stage, ~3 min)"
    )
    add_config_arguments(parser, default_preset="embedded")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    if args.quick:
        args.preset = "quick"
    if args.run_dir:
        args.overrides = [*args.overrides, f"evolve.run_dir={json.dumps(args.run_dir)}"]
    cfg = config_from_args(args)
    report = evolve(cfg)
    print(report["markdown"])
    return 0
