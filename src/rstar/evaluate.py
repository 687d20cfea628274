"""`rstar eval`: search modes on a benchmark, the paper's answer selection, scaling curves and
the reward-model ablation (paper section 4: Figure 3, Table 8).

Every mode's searches go to `OUT/<run>/trees.jsonl` through the same `generate` as data
generation (so a killed eval resumes), then metrics are computed from the tree files:

- a *trajectory* is one complete solution with an answer and a reward score: for MCTS and
  beam search, each independent search (its own seed) contributes the answer it settles on
  (`best_answer_node`); best-of-N contributes each of its N sampled solutions; greedy one;
- at budget k (the first k trajectories, so one run serves every budget on the curve):
  `majority` (self-consistency), `best_of_n` (highest reward score), `topk_vote` (the paper's
  final answer: majority vote over the top-K trajectories by score), `topk_weighted` (the same
  vote weighted by score), and `pass` (any correct: an upper bound).

Answers are grouped into equivalence classes with the grader (math-verify), so `0.5` and
`\\frac{1}{2}` vote together.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rstar import RstarError
from rstar.checks import check_models, positive_int
from rstar.config import Config, SearchConfig, add_config_arguments
from rstar.lock import writes_to
from rstar.search.expand import best_answer_node
from rstar.search.tree import Tree
from rstar.search.treefile import iter_records, record_by_value

if TYPE_CHECKING:
    from rstar.search.ray_runner import RayOptions

METRICS = ("majority", "best_of_n", "topk_vote", "topk_weighted", "pass")

# Benchmarks by name: a local file `{file}` in the data directory when there is one (the
# authors' eval_data names), else the hub dataset.
BENCHMARKS: dict[str, dict] = {
    "math500": {
        "file": "math500_test.json",
        "hub": "hf:HuggingFaceH4/MATH-500::test",
        "answer": "answer",
        "question": "problem",
    },
    "aime2024": {
        "file": "aime2024_test.json",
        "hub": "hf:Maxwell-Jia/AIME_2024::train",
        "answer": "Answer",
        "question": "Problem",
    },
    "amc23": {
        "file": "amc23_test.json",
        "hub": "hf:math-ai/amc23::test",
        "answer": "answer",
        "question": "question",
    },
    "gsm8k": {
        "file": "GSM8K_test.json",
        "hub": "hf:openai/gsm8k:main:test",
        "answer": "answer",
        "question": "question",
    },
    "olympiadbench": {
        "file": "olympiadbench_test.json",
        "hub": "hf:Hothan/OlympiadBench:OE_TO_maths_en_COMP:train",
        "answer": "final_answer",
        "question": "question",
    },
    "collegemath": {
        "file": "collegemath_test.json",
        "hub": "hf:realtreetune/college_math::test",
        "answer": "answer",
        "question": "question",
    },
    "gaokao2023en": {
        "file": "gaokao2023en_test.json",
        "hub": "hf:MARIO-Math-Reasoning/Gaokao2023-Math-En::train",
        "answer": "answer",
        "question": "question",
    },
    "omni-math": {
        "file": "omni-math_test.json",
        "hub": "hf:KbsdJames/Omni-MATH::test",
        "answer": "answer",
        "question": "problem",
    },
}


def load_benchmark(name: str, data_dir: str | None = None, limit: int | None = None) -> list:
    """A benchmark by name, the embedded world's test split (`world`), or any problem file.

    A named benchmark is read from the first of: `data_dir`, `$RSTAR_DATA_DIR`, the files that
    ship with the package (MATH-500, AIME 2024, AMC 2023 and GSM8K in the authors' eval_data
    format, so that these work offline as in the authors' and Qwen's harnesses), and last the
    hub dataset under its own field names."""
    from rstar.data.problems import PACKAGED_BENCHMARKS, ProblemError, load_problems
    from rstar.data.sets import is_world_spec, load_problem_set

    if is_world_spec(name):  # world[:SPLIT][:LEVELS][:N] (rstar.data.sets)
        return load_problem_set(name, limit=limit)
    spec = BENCHMARKS.get(name.lower())
    if spec is None:
        if not Path(name).exists():
            raise RstarError(
                f"unknown benchmark {name!r}: not a file, and not one of {', '.join(['world', *BENCHMARKS])}"
            )
        return load_problems(name, limit=limit)
    dirs = [d for d in (data_dir, os.environ.get("RSTAR_DATA_DIR"), PACKAGED_BENCHMARKS) if d]
    for d in dirs:
        for path in Path(d).glob("*"):
            if path.name.lower() == spec["file"].lower():
                return load_problems(path, limit=limit)
    # the hub, with the dataset's own field names
    try:
        return load_problems(
            spec["hub"], question_field=spec["question"], answer_field=spec["answer"], limit=limit
        )
    except ProblemError as e:
        raise RstarError(
            f"benchmark {name!r}: no file {spec['file']} in --data-dir or $RSTAR_DATA_DIR, and {e}"
        ) from e


# --- trajectories and metrics -----------------------------------------------------------------


@dataclass
class Trajectory:
    answer: str | None
    score: float | None  # reward-model value of the answer step
    correct: bool
    order: int  # position in the budget axis: search index, sample index or MCTS rollout


def trajectories(rec: dict, unit: str = "searches") -> list[Trajectory]:
    """The complete solutions a tree-file record contributes (see module docstring).

    `unit` says what one trajectory of an MCTS record is: "searches" (the paper: each
    independent search contributes the answer it settles on) or "rollouts" (every terminal
    the search reached, ordered by the rollout that first reached it: "N rollouts" then
    compares with best-of-N at the same number of complete solutions)."""
    tree = Tree.from_dict(rec["tree"])
    if rec.get("mode") == "bon":
        ends = [n for n in tree.nodes if n.is_terminal]  # in sampling order
        return [Trajectory(n.answer, n.value, bool(n.correct), i) for i, n in enumerate(ends)]
    if rec.get("mode") == "mcts" and unit == "rollouts":
        ends = sorted((n for n in tree.nodes if n.rollout is not None), key=lambda n: n.rollout)
        return [Trajectory(n.answer, n.value, bool(n.correct), n.rollout) for n in ends]
    best = best_answer_node(tree, record_by_value(rec))
    i = rec.get("search_index", 0)
    if best is None:
        return [Trajectory(None, None, False, i)]
    return [Trajectory(best.answer, best.value, bool(best.correct), i)]


def within(trajs: list[Trajectory], k: int) -> list[Trajectory]:
    """The trajectories a budget of k affords."""
    return [t for t in trajs if t.order < k]


def _classes(answers: list[str | None], same: Callable[[str, str], bool]) -> list[int]:
    """Index of each answer's equivalence class (None answers get their own class each)."""
    reps: list[str] = []
    out = []
    for a in answers:
        if a is None:
            out.append(-1 - len(out))
            continue
        for i, r in enumerate(reps):
            if a == r or same(r, a):
                out.append(i)
                break
        else:
            reps.append(a)
            out.append(len(reps) - 1)
    return out


def _choices(
    trajs: list[Trajectory], top_k: int, same: Callable[[str, str], bool]
) -> tuple[dict[str, str | None], dict[str, bool]]:
    """(the answer each selection rule picks, whether it is correct) on these trajectories.
    `pass` picks no answer (it asks whether any trajectory is correct)."""
    if not trajs:
        return dict.fromkeys(METRICS, None), dict.fromkeys(METRICS, False)
    cls = _classes([t.answer for t in trajs], same)

    def correct_of(c: int) -> bool:
        return any(t.correct for t, k in zip(trajs, cls) if k == c)

    def vote(idx: list[int], weight: Callable[[int], float]) -> int | None:
        tally: dict[int, float] = defaultdict(float)
        for i in idx:
            if trajs[i].answer is not None:
                tally[cls[i]] += weight(i)
        if not tally:
            return None
        # ties: the class that reached the top first (deterministic)
        return max(tally.items(), key=lambda kv: (kv[1], -min(i for i in idx if cls[i] == kv[0])))[0]

    score = [t.score if t.score is not None else -1.0 for t in trajs]
    ranked = sorted(range(len(trajs)), key=lambda i: -score[i])
    top = ranked[:top_k]
    first = ranked[0]
    picked = {
        "majority": vote(list(range(len(trajs))), lambda i: 1.0),
        "best_of_n": cls[first] if trajs[first].answer is not None else None,
        "topk_vote": vote(top, lambda i: 1.0),
        # scores are in [-1, 1]; shift to (0, 2] so a vote never subtracts
        "topk_weighted": vote(top, lambda i: score[i] + 1.0 + 1e-6),
    }
    answers: dict[str, str | None] = {
        rule: None if c is None else next(t.answer for t, k in zip(trajs, cls) if k == c)
        for rule, c in picked.items()
    }
    correct = {rule: c is not None and correct_of(c) for rule, c in picked.items()}
    answers["pass"] = None
    correct["pass"] = any(t.correct for t in trajs)
    return answers, correct


def select(trajs: list[Trajectory], top_k: int, same: Callable[[str, str], bool]) -> dict[str, bool]:
    """Correctness of each answer-selection rule on these trajectories."""
    return _choices(trajs, top_k, same)[1]


def metrics_at_budgets(
    per_problem: dict[str, tuple[dict, list[Trajectory]]],
    budgets: list[int],
    top_k: int,
    same: Callable[[str, str], bool],
) -> dict:
    """{budget: {metric: accuracy, "n": problems, "levels": {level: {metric: accuracy, "n": problems}}}}."""
    out = {}
    for k in budgets:
        totals: dict[str, Counter] = defaultdict(Counter)
        counts: Counter = Counter()
        for problem, trajs in per_problem.values():
            verdict = select(within(trajs, k), top_k, same)
            for level in ("all", str(problem.get("level"))) if problem.get("level") is not None else ("all",):
                counts[level] += 1
                for m, ok in verdict.items():
                    totals[level][m] += ok
        acc = {
            lvl: {**{m: totals[lvl][m] / counts[lvl] for m in METRICS}, "n": counts[lvl]} for lvl in counts
        }
        out[k] = {
            **acc.pop("all", dict.fromkeys(METRICS, 0.0)),
            "n": counts["all"],
            "levels": dict(sorted(acc.items())),
        }
    return out


def group_by_problem(
    records: Iterable[dict], unit: str = "searches"
) -> dict[str, tuple[dict, list[Trajectory]]]:
    """Trajectories of each problem, in budget order."""
    by: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by[rec["problem"]["id"]].append(rec)
    return {
        pid: (
            recs[0]["problem"],
            sorted((t for r in recs for t in trajectories(r, unit)), key=lambda t: t.order),
        )
        for pid, recs in by.items()
    }


def budget_held(records: list[dict], unit: str = "searches") -> int:
    """The largest budget every problem's records afford: the rollouts each MCTS search ran
    (unit "rollouts"), the samples of best-of-N, else the number of independent searches."""
    per_problem: dict[str, int] = defaultdict(int)
    for rec in records:
        search = (rec.get("config") or {}).get("search") or {}
        pid = rec["problem"]["id"]
        if rec.get("mode") == "bon":
            per_problem[pid] = max(per_problem[pid], int(search.get("trajectories", 0)))
        elif rec.get("mode") == "mcts" and unit == "rollouts":
            per_problem[pid] = max(per_problem[pid], int(search.get("rollouts", 0)))
        else:
            per_problem[pid] += 1
    return min(per_problem.values(), default=0)


# --- running -----------------------------------------------------------------------------------


@dataclass
class EvalRun:
    """One search setting of an evaluation: a mode and the reward model it uses."""

    name: str  # directory name and plot label, e.g. "mcts-ppm", "bon-ppm", "greedy"
    mode: str
    reward: str = ""  # reward model directory ("" = none)


def eval_search_config(search: SearchConfig, mode: str, k_max: int, mcts_unit: str) -> SearchConfig:
    """The search settings of one evaluation run at the largest budget `k_max`."""
    search = dataclasses.replace(search, mode=mode, trajectories=1 if mode == "greedy" else k_max)
    if mode == "mcts":
        # Inference (the paper's Figure 3 search): no ground truth in the values; every new
        # step starts from its PPM value (one visit) and the answer's PPM score is backed up,
        # so the reward model steers selection and scores the outcome.
        search = dataclasses.replace(search, terminal_guided=False, ppm_init=True)
        if mcts_unit == "rollouts":
            search = dataclasses.replace(search, rollouts=k_max, trajectories=1)
    return search


def run_config(cfg: Config, run: EvalRun, k_max: int, mcts_unit: str) -> Config:
    """The config of one evaluation setting's searches."""
    search = eval_search_config(cfg.search, run.mode, k_max, mcts_unit)
    return dataclasses.replace(cfg, search=search, model=dataclasses.replace(cfg.model, ppm=run.reward))


@writes_to("out_dir")
def run_eval(
    problems: list,
    cfg: Config,
    runs: list[EvalRun],
    budgets: list[int],
    out_dir: str | Path,
    top_k: int = 4,
    resume: bool = False,
    policy=None,
    show_progress: bool = True,
    mcts_unit: str = "searches",
    ray: RayOptions | None = None,
) -> dict:
    """Run every setting on `problems` (max(budgets) trajectories each) and write
    OUT/summary.json, OUT/results.jsonl; returns the summary.

    `mcts_unit="searches"` runs max(budgets) independent MCTS searches per problem (the
    paper's "64 trajectories"); "rollouts" runs one search of max(budgets) rollouts and
    counts each terminal it reached as a trajectory, ordered by the rollout that reached it.

    With `ray`, each setting's searches run on Ray actors that load the models from
    `cfg.model` themselves (docs/RAY.md)."""
    from rstar.grading import Grader
    from rstar.models import load_policy, load_reward
    from rstar.search.jobs import open_backends
    from rstar.search.run import generate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k_max = max(budgets)
    if ray is not None and policy is not None:
        raise RstarError("run_eval: with ray, the actors load the policy from cfg.model; do not pass policy")
    if resume:  # before any model loads: a directory of other settings is refused at once
        from rstar.search.jobs import check_resume

        for run in runs:
            if (out / run.name).is_dir():
                check_resume(out / run.name, run_config(cfg, run, k_max, mcts_unit))
    if ray is None:
        policy = policy if policy is not None else load_policy(cfg.model)
    session = contextlib.nullcontext()
    if ray is not None:
        from rstar.search.ray_runner import ray_session

        session = ray_session(ray)  # one connection (or local Ray instance) for every setting
    summary: dict = {"budgets": budgets, "top_k": top_k, "runs": {}}
    results_path = out / "results.jsonl"
    results_path.write_text("")
    with session, Grader(timeout_s=cfg.scheduler.grading_timeout_s) as grader:
        cache: dict[tuple[str, str], bool] = {}

        def same(a: str, b: str) -> bool:
            if (a, b) not in cache:
                cache[(a, b)] = cache[(b, a)] = grader.grade(a, b)
            return cache[(a, b)]

        for run in runs:
            rcfg = run_config(cfg, run, k_max, mcts_unit)
            model = rcfg.model
            if ray is not None:
                generate(
                    problems,
                    rcfg,
                    out / run.name,
                    resume=resume,
                    show_progress=show_progress,
                    description=f"eval {run.name}",
                    ray=ray,
                )
            else:
                reward = load_reward(model) if run.reward else None
                with open_backends(rcfg, policy=policy, reward=reward) as backends:
                    generate(
                        problems,
                        rcfg,
                        out / run.name,
                        resume=resume,
                        backends=backends,
                        show_progress=show_progress,
                        description=f"eval {run.name}",
                    )
            records = list(iter_records(out / run.name / "trees.jsonl"))
            per_problem = group_by_problem(records, mcts_unit)
            run_budgets = [1] if run.mode == "greedy" else budgets
            held = budget_held(records, mcts_unit)
            if any(k > held for k in run_budgets):
                print(
                    f"eval {run.name}: its records hold a budget of {held} trajectories per problem; "
                    f"budgets above it are not reported",
                    file=sys.stderr,
                )
                run_budgets = [k for k in run_budgets if k <= held]
            summary["runs"][run.name] = {
                "mode": run.mode,
                "reward": run.reward,
                "unit": mcts_unit if run.mode == "mcts" else ("samples" if run.mode == "bon" else "searches"),
                "metrics": metrics_at_budgets(per_problem, run_budgets, top_k, same),
            }
            with open(results_path, "a") as f:
                for pid, (problem, trajs) in per_problem.items():
                    row = {
                        "run": run.name,
                        "problem_id": pid,
                        "level": problem.get("level"),
                        "gold": problem.get("answer"),
                        "trajectories": [dataclasses.asdict(t) for t in trajs],
                        "selected": select(within(trajs, k_max), top_k, same),
                        # per budget: the answer each rule picks and whether it is correct
                        "by_budget": {
                            str(k): dict(zip(("answers", "correct"), _choices(within(trajs, k), top_k, same)))
                            for k in run_budgets
                        },
                    }
                    f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- reports -----------------------------------------------------------------------------------


def scaling_plot(
    summary: dict, path: str | Path, metric_for: dict[str, str] | None = None, title: str = ""
) -> Path:
    """Accuracy against trajectories per run (the paper's Figure 3), on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_for = metric_for or {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in summary["runs"].items():
        ks = sorted(int(k) for k in run["metrics"])
        metric = metric_for.get(name, "topk_vote" if run["mode"] in ("mcts", "beam") else "best_of_n")
        ys = [100 * run["metrics"][k if k in run["metrics"] else str(k)][metric] for k in ks]
        if len(ks) == 1:
            ax.axhline(ys[0], linestyle="--", color="gray", label=f"{name} ({metric})")
        else:
            ax.plot(ks, ys, marker="o", label=f"{name} ({metric})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trajectories per problem")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "test-time scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def summary_table(summary: dict, budget: int | None = None) -> str:
    """A Markdown table: one row per run and budget (with `budget`: per run, that budget, or
    the largest the run has when it lacks it)."""
    rows = ["| run | mode | reward | k | " + " | ".join(METRICS) + " |", "|" + " --- |" * (4 + len(METRICS))]
    for name, run in summary["runs"].items():
        ks = sorted(int(k) for k in run["metrics"])
        if budget is not None:
            ks = [budget if budget in ks else ks[-1]]
        reward = Path(run["reward"]).name if run["reward"] else "-"
        for k in ks:
            m = run["metrics"][k if k in run["metrics"] else str(k)]
            rows.append(
                f"| {name} | {run['mode']} | {reward} | {k} | "
                + " | ".join(f"{100 * m[x]:.1f}" for x in METRICS)
                + " |"
            )
    return "\n".join(rows)


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rstar.search.ray_runner import add_ray_arguments  # no Ray import: that waits for a --ray run

    parser.add_argument(
        "--benchmark", required=True, help=f"a name ({', '.join(['world', *BENCHMARKS])}) or a problem file"
    )
    parser.add_argument("--policy", required=True, help="policy model (HF directory or hub name)")
    parser.add_argument("--ppm", default="", help="reward model directory used by mcts/beam/bon")
    parser.add_argument("--mode", default="mcts", help="comma-separated modes: mcts,beam,bon,greedy")
    parser.add_argument(
        "--trajectories", default="1,4,16,64", help="budgets, comma-separated (one run serves all)"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=4, help="trajectories in the paper's final vote (4-8)"
    )
    parser.add_argument(
        "--mcts-unit",
        choices=["searches", "rollouts"],
        default="searches",
        help="an MCTS trajectory: an independent search (paper) or one rollout of a single search",
    )
    parser.add_argument(
        "--ablation",
        default="",
        metavar="NAME=DIR,...",
        help="reward models to compare with mcts (e.g. ppm=DIR,pqm=DIR,orm=DIR): the paper's Table 8",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an evaluation in --out that stopped: finished searches are kept, the rest run "
        "(the settings must match the first run's)",
    )
    parser.add_argument("--limit", type=positive_int, help="only the first N problems")
    parser.add_argument("--data-dir", help="directory of local benchmark files (also $RSTAR_DATA_DIR)")
    add_config_arguments(parser, default_preset="eval")
    add_ray_arguments(parser)
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from rstar.config import config_from_args
    from rstar.search.ray_runner import ray_options_from_args

    args.overrides = [f"model.policy={json.dumps(args.policy)}", *args.overrides]
    cfg = config_from_args(args)
    budgets = sorted({int(x) for x in args.trajectories.split(",") if x.strip()})
    if not budgets or budgets[0] < 1:
        raise RstarError(f"--trajectories {args.trajectories!r}: expected positive integers like 1,4,16")
    runs = []
    for mode in [m.strip() for m in args.mode.split(",") if m.strip()]:
        if mode not in ("mcts", "beam", "bon", "greedy"):
            raise RstarError(f"--mode: unknown mode {mode!r} (mcts, beam, bon, greedy)")
        reward = "" if mode == "greedy" else args.ppm
        runs.append(EvalRun(name=f"{mode}-ppm" if reward else mode, mode=mode, reward=reward))
    for item in [a for a in args.ablation.split(",") if a.strip()]:
        name, sep, path = item.partition("=")
        if not sep:
            raise RstarError(f"--ablation {item!r}: expected NAME=DIR")
        runs.append(EvalRun(name=f"mcts-{name.strip()}", mode="mcts", reward=path.strip()))
    problems = load_benchmark(args.benchmark, args.data_dir, args.limit)
    if not problems:
        raise RstarError(f"--benchmark {args.benchmark}: no problems in it")
    options = ray_options_from_args(args)
    if options is None:
        check_models(cfg.model)
        for run in runs:
            if run.reward:
                check_models(
                    dataclasses.replace(cfg.model, ppm=run.reward), ppm_flag=f"{run.name}: reward model"
                )
    summary = run_eval(
        problems,
        cfg,
        runs,
        budgets,
        args.out,
        top_k=args.top_k,
        resume=args.resume,
        mcts_unit=args.mcts_unit,
        ray=options,
    )
    scaling_plot(summary, Path(args.out) / "scaling.png", title=f"{args.benchmark}")
    table = summary_table(summary)
    (Path(args.out) / "summary.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {args.out}/summary.json, results.jsonl, scaling.png")
    return 0
