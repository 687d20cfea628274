"""`rstar generate`: search every problem of a file and append each finished tree to a tree file.

Output directory layout:
    OUT/trees.jsonl   one record per finished search (docs/TREE_FILES.md)
    OUT/errors.jsonl  searches that raised (with the traceback); retried by --resume
    OUT/run.json      the resolved config, versions and the command's arguments
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rstar import RstarError
from rstar.config import Config, add_config_arguments, config_from_args
from rstar.progress import Reporter
from rstar.search.expand import derive_seed, needs_reward
from rstar.search.scheduler import Backends, Job, Stats, run_jobs
from rstar.search.tree import Tree
from rstar.search.treefile import TreeFileWriter, open_for_resume, versions

if TYPE_CHECKING:
    from rstar.distributed import RayOptions


def searches_per_problem(cfg: Config) -> int:
    # Best-of-N samples its N solutions inside one search; the other modes run
    # `trajectories` independent searches, each with its own seed.
    return 1 if cfg.search.mode == "bon" else cfg.search.trajectories


def make_jobs(problems: list, cfg: Config, skip: set[str] = frozenset()) -> list[Job]:
    jobs = []
    for p in problems:
        for i in range(searches_per_problem(cfg)):
            job = Job(problem=p, index=i, seed=derive_seed(cfg.search.seed, p.id, i))
            if job.key not in skip:
                jobs.append(job)
    return jobs


@contextlib.contextmanager
def open_backends(cfg: Config, policy=None, reward=None, need_grader: bool = True) -> Iterator[Backends]:
    """Sandbox pool and grader (worker processes), started before the models are loaded so
    their workers do not inherit the model's memory; then the policy and reward model."""
    from rstar.grading import Grader
    from rstar.models import load_policy, load_reward
    from rstar.sandbox import SandboxConfig, SandboxPool

    s = cfg.sandbox
    sandbox_cfg = SandboxConfig(
        timeout_s=s.timeout_s,
        memory_mb=s.memory_mb,
        max_output_bytes=s.max_output_bytes,
        max_file_bytes=s.max_file_bytes,
        max_processes=s.max_processes,
        workers=s.workers,
        output_style=s.output_style,
    )
    with SandboxPool(sandbox_cfg) as sandbox, contextlib.ExitStack() as stack:
        grader = (
            stack.enter_context(Grader(timeout_s=cfg.scheduler.grading_timeout_s)) if need_grader else None
        )
        policy = policy if policy is not None else load_policy(cfg.model)
        reward = reward if reward is not None else load_reward(cfg.model)
        yield Backends(policy=policy, sandbox=sandbox, reward=reward, grader=grader)


def check_reward(cfg: Config, reward) -> None:
    if reward is None and needs_reward(cfg.search):
        what = (
            "PPM-initialised MCTS" if cfg.search.ppm_init else f"search.mode={cfg.search.mode} at inference"
        )
        raise RstarError(f"{what} needs a reward model: pass --ppm DIR (or set model.ppm)")


def record(job: Job, tree: Tree, info: dict, cfg: Config, vers: dict) -> dict:
    """One tree-file line (docs/TREE_FILES.md)."""
    return {
        "key": job.key,
        "problem": job.problem.to_dict(),
        "search_index": job.index,
        "seed": job.seed,
        "mode": cfg.search.mode,
        "answer": info["answer"],
        "correct": info["correct"],
        "stats": {k: info[k] for k in ("seconds", "nodes", "tokens")},
        "tree": tree.to_dict(),
        "config": cfg.to_dict(),
        "versions": vers,
    }


def prepare_run(
    problems: list, cfg: Config, out_dir: str | Path, resume: bool, extra: dict | None = None
) -> tuple[Path, list[Job], dict]:
    """Check OUT (an existing run needs `resume`), cut a partial last line off its tree file,
    write run.json; return (OUT, the jobs not yet done, versions). Shared with the Ray runner."""
    out = Path(out_dir)
    trees_path = out / "trees.jsonl"
    if trees_path.exists() and trees_path.stat().st_size and not resume:
        raise RstarError(
            f"{trees_path} already holds trees: pass --resume to continue that run, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    done = open_for_resume(trees_path)
    jobs = make_jobs(problems, cfg, skip=done)
    vers = versions()
    (out / "run.json").write_text(
        json.dumps({"config": cfg.to_dict(), "versions": vers, "argv": sys.argv, **(extra or {})}, indent=2)
    )
    return out, jobs, vers


def generate(
    problems: list,
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    backends: Backends | None = None,
    show_progress: bool = True,
    description: str = "generate",
    ray: RayOptions | None = None,
) -> Stats:
    """Search every problem (x searches_per_problem) into OUT/trees.jsonl; resumable.
    With `ray`, the searches run on Ray actors that build their own backends (docs/RAY.md)."""
    if ray is not None:
        if backends is not None:
            raise RstarError("generate: with ray, each actor builds its own backends; do not pass backends")
        from rstar.distributed import generate_ray

        return generate_ray(
            problems, cfg, out_dir, resume, ray, show_progress=show_progress, description=description
        )
    out, jobs, vers = prepare_run(problems, cfg, out_dir, resume)
    trees_path = out / "trees.jsonl"
    if not jobs:
        return Stats()
    with contextlib.ExitStack() as stack:
        if backends is None:
            backends = stack.enter_context(open_backends(cfg))
        check_reward(cfg, backends.reward)
        writer = stack.enter_context(TreeFileWriter(trees_path))
        errors = stack.enter_context(TreeFileWriter(out / "errors.jsonl", fsync=False))
        reporter = stack.enter_context(Reporter(len(jobs), description, enabled=show_progress))

        def on_done(job: Job, tree: Tree, info: dict) -> None:
            writer.write(record(job, tree, info, cfg, vers))

        def on_error(job: Job, tb: str) -> None:
            errors.write({"key": job.key, "problem_id": job.problem.id, "error": tb, "time": time.time()})
            print(f"search {job.key} failed:\n{tb}", file=sys.stderr)

        def progress(stats: Stats) -> None:
            d = stats.as_dict()
            solved = stats.solved / stats.done if stats.done else 0.0
            reporter.update(
                stats.done,
                f"solved {solved:.0%} | {d['nodes_per_s']:.0f} nodes/s | {d['tokens_per_s']:.0f} tok/s",
            )

        return run_jobs(jobs, cfg, backends, on_done, on_error, progress)


# --- CLI --------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", help="policy model: HF directory or hub name (sets model.policy)")
    parser.add_argument("--ppm", help="reward model directory (sets model.ppm)")
    parser.add_argument(
        "--backend", choices=["hf", "vllm", "openai"], help="policy backend (sets model.backend)"
    )


def config_with_model_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    for flag, key in (("policy", "model.policy"), ("ppm", "model.ppm"), ("backend", "model.backend")):
        value = getattr(args, flag, None)
        if value:
            overrides.append(f"{key}={json.dumps(value)}")
    args.overrides = overrides
    return config_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rstar.distributed import add_ray_arguments  # no Ray import: that waits for a --ray run

    parser.add_argument(
        "--problems", required=True, help="problem file (.json/.jsonl) or hf:NAME[:CONFIG][:SPLIT]"
    )
    parser.add_argument("--out", required=True, help="run directory (trees.jsonl, errors.jsonl, run.json)")
    parser.add_argument(
        "--resume", action="store_true", help="continue a run in --out that was stopped or killed"
    )
    parser.add_argument("--limit", type=int, help="only the first N problems")
    add_model_arguments(parser)
    add_config_arguments(parser, default_preset="round2")
    add_ray_arguments(parser)
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from rstar.data.problems import load_problems
    from rstar.distributed import ray_options_from_args

    cfg = config_with_model_args(args)
    problems = load_problems(args.problems, limit=args.limit)
    stats = generate(problems, cfg, args.out, resume=args.resume, ray=ray_options_from_args(args))
    print(json.dumps(stats.as_dict()))
    return 0
