"""What the search spends its rollouts on: the embedded world's round-2 search, measured.

Pre-trains the embedded demo's base policy once (as `rstar evolve` does: the seed set, the
embedded preset's pre-training; cached in --work), then runs the embedded preset's round-2
search (terminal-guided MCTS, its rollouts, samples and temperature) over the 90 training
problems and prints, from the tree files:
- the share of rollouts that ended at a step whose code failed,
- the share of rollouts that ended with no answer at all,
- answers per tree, and coverage (problems with a correct answer) per level.

To compare with another version of the search, run this same file with that version first on
the import path, on the same --work directory (the policy and problems are reused):

    python bench/faithful.py --work /tmp/faithful                      # this checkout
    git worktree add /tmp/old d7b1f3f
    PYTHONPATH=/tmp/old/src python bench/faithful.py --work /tmp/faithful --label before

The rollout counts read both tree semantics: before issue 16 every rollout ended at one
terminal and a failed step's N counted the rollouts that ended there; since, failed steps are
never selected (N = 1, their own -1), and each answer carries the rollout that created it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path


def prepare(work: Path) -> Path:
    """The embedded run's problems and pre-trained base policy in `work` (built once)."""
    from rstar.config import load_config
    from rstar.evolve import build_base, prepare_problems

    base = work / "models" / "base"
    if not (base / "config.json").exists():
        cfg = load_config("embedded")
        prepare_problems(cfg, work)
        t0 = time.perf_counter()
        build_base(cfg, work, cfg.evolve.policy_size, "base")
        print(f"pre-training: {time.perf_counter() - t0:.0f} s (the machine's yardstick)", flush=True)
    return base


def search(work: Path, label: str, r: int, seed: int, overrides: list[str]) -> Path:
    import dataclasses

    from rstar.config import load_config
    from rstar.data.problems import load_problems
    from rstar.evolve import round_config
    from rstar.search.run import generate

    try:
        from rstar.search.jobs import open_backends
    except ImportError:  # before the runners' shared module existed
        from rstar.search.run import open_backends

    cfg = round_config(load_config("embedded", overrides=overrides), r)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, policy=str(work / "models" / "base"), ppm=""),
        search=dataclasses.replace(cfg.search, ppm_init=False, seed=seed),
    )
    out = work / f"{label}-round{r}-seed{seed}"
    problems = load_problems(work / "problems" / "train.jsonl")
    t0 = time.perf_counter()
    with open_backends(cfg) as backends:
        generate(problems, cfg, out, resume=True, backends=backends, show_progress=False)
    print(f"{label}: search {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def measure(out: Path) -> dict:
    from rstar.search import tree as tree_mod

    pruning = hasattr(tree_mod, "is_open")  # the search since issue 16
    rollouts = failed_ends = no_answer = answers = 0
    covered: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    trees = 0
    for line in (out / "trees.jsonl").read_text().splitlines():
        rec = json.loads(line)
        nodes = rec["tree"]["nodes"]
        trees += 1
        ans = [n for n in nodes if n["terminal"] == "answer"]
        answers += len(ans)
        level = str(rec["problem"].get("level"))
        covered[level][1] += 1
        covered[level][0] += any(n["correct"] for n in ans)
        if pruning:
            stamps = {n["rollout"] for n in nodes if n["rollout"] is not None}
            used = 1 + max(stamps, default=-1)
            rollouts += used
            no_answer += used - len({n["rollout"] for n in ans})
        else:
            rollouts += nodes[0]["N"]  # every rollout backed one terminal up through the root
            failed_ends += sum(n["N"] for n in nodes if n["terminal"] == "code_error")
            no_answer += sum(n["N"] for n in nodes if n["terminal"] not in (None, "answer"))
    cov = {lv: f"{c}/{n}" for lv, (c, n) in sorted(covered.items())}
    total = sum(c for c, _ in covered.values())
    return {
        "trees": trees,
        "rollouts": rollouts,
        "rollouts_ending_at_failed_code": round(failed_ends / max(rollouts, 1), 3),
        "rollouts_ending_without_answer": round(no_answer / max(rollouts, 1), 3),
        "answers_per_tree": round(answers / max(trees, 1), 2),
        "coverage": f"{total}/{trees}",
        "coverage_by_level": cov,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/rstar-faithful", help="cache of the problems and base policy")
    ap.add_argument("--label", default="after", help="name of this version's tree directory")
    ap.add_argument("--round", type=int, default=2, help="the embedded preset's round whose settings to use")
    ap.add_argument(
        "--seeds", default="0", help="comma-separated search seeds (one search of all problems each)"
    )
    ap.add_argument(
        "--set", action="append", default=[], help="a config override, e.g. search.unvisited=zero"
    )
    args = ap.parse_args()
    work = Path(args.work)
    prepare(work)
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = search(work, args.label, args.round, seed, args.set)
        print(json.dumps({"label": args.label, "seed": seed, **measure(out)}), flush=True)


if __name__ == "__main__":
    main()
