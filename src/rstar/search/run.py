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
from pathlib import Path
from typing import TYPE_CHECKING

from rstar import RstarError
from rstar.checks import check_models, positive_int
from rstar.config import Config, add_config_arguments, config_from_args
from rstar.lock import writes_to
from rstar.progress import Reporter
from rstar.search.jobs import check_reward, open_backends, prepare_run, record
from rstar.search.scheduler import Backends, Job, Stats, run_jobs
from rstar.search.tree import Tree
from rstar.search.treefile import TreeFileWriter

if TYPE_CHECKING:
    from rstar.search.ray_runner import RayOptions


@writes_to("out_dir")
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
        from rstar.search.ray_runner import generate_ray

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
    from rstar.search.ray_runner import add_ray_arguments  # no Ray import: that waits for a --ray run

    parser.add_argument(
        "--problems",
        required=True,
        help="problem file (.json/.jsonl), hf:NAME[:CONFIG][:SPLIT], or world[:train|test][:LEVELS][:N]",
    )
    parser.add_argument("--out", required=True, help="run directory (trees.jsonl, errors.jsonl, run.json)")
    parser.add_argument(
        "--resume", action="store_true", help="continue a run in --out that was stopped or killed"
    )
    parser.add_argument("--limit", type=positive_int, help="only the first N problems")
    add_model_arguments(parser)
    add_config_arguments(parser, default_preset="round2")
    add_ray_arguments(parser)
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from rstar.data.sets import load_problem_set
    from rstar.search.ray_runner import ray_options_from_args

    cfg = config_with_model_args(args)
    problems = load_problem_set(args.problems, limit=args.limit)
    if not problems:
        raise RstarError(f"--problems {args.problems}: no problems in it")
    options = ray_options_from_args(args)
    if options is None:  # (Ray actors load the models where they run)
        check_models(cfg.model)
    stats = generate(problems, cfg, args.out, resume=args.resume, ray=options)
    print(json.dumps(stats.as_dict()))
    return 0
