"""What a generation run is made of, shared by the one-machine runner (`search/run.py`) and the
Ray runner (`search/ray_runner.py`): the searches to run (`make_jobs`), the backends they use
(`open_backends`), the run directory (`prepare_run`) and the tree-file line each finished
search becomes (`record`). Both runners import this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rstar import RstarError
from rstar.config import Config
from rstar.search.expand import derive_seed, needs_reward
from rstar.search.scheduler import Backends, Job
from rstar.search.tree import Tree
from rstar.search.treefile import iter_records, open_for_resume, versions


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
    from rstar.sandbox import SandboxPool

    with SandboxPool(cfg.sandbox) as sandbox, contextlib.ExitStack() as stack:
        grader = (
            stack.enter_context(Grader(timeout_s=cfg.scheduler.grading_timeout_s)) if need_grader else None
        )
        policy = policy if policy is not None else load_policy(cfg.model)
        reward = reward if reward is not None else load_reward(cfg.model)
        yield Backends(policy=policy, sandbox=sandbox, reward=reward, grader=grader)


def check_reward(cfg: Config, reward) -> None:
    if reward is None and needs_reward(cfg.search):
        named = {"beam": "step beam search (--mode beam)", "bon": "best-of-N (--mode bon)"}
        what = named.get(cfg.search.mode) or (
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


# The settings that decide what a run's records hold: a resumed run must keep them.
DECIDING = ("model.policy", "model.ppm", "model.backend", "search", "sandbox.output_style")


def _model_ref(value: Any) -> Any:
    """A model named by a path compares by its real path (./m and m are one model)."""
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.realpath(value)
    return value


def deciding_settings(config: dict) -> dict[str, Any]:
    """{"section.field": value} of the settings in DECIDING, from a config dict."""
    out: dict[str, Any] = {}
    for key in DECIDING:
        section, _, name = key.partition(".")
        values = config.get(section) or {}
        if name:
            out[key] = _model_ref(values.get(name)) if section == "model" else values.get(name)
        else:
            out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


def _recorded_config(out: Path) -> dict | None:
    """The config a run directory was written with: its run.json, else its first record's."""
    run_json = out / "run.json"
    if run_json.is_file():
        try:
            return json.loads(run_json.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise RstarError(f"{run_json}: not a run description ({e}); cannot check --resume") from e
    trees = out / "trees.jsonl"
    if trees.is_file():
        for rec in iter_records(trees, strict=False):
            return rec.get("config")
    return None


def check_resume(out: Path, cfg: Config) -> None:
    """Refuse to resume a run directory written with other deciding settings (one-line diff).
    More independent searches per problem (`search.trajectories` of mcts, beam or greedy runs)
    only add records, so that change is allowed: the records already there stay valid."""
    old_cfg = _recorded_config(out)
    if old_cfg is None:
        return
    old, new = deciding_settings(old_cfg), deciding_settings(cfg.to_dict())
    # A field the directory's config lacks came after it was written: that run had the field's
    # default behaviour. Fields since removed decide nothing any more.
    default = deciding_settings(Config().to_dict())
    old = {k: old.get(k, default.get(k)) for k in new}
    extendable = old.get("search.mode") == new.get("search.mode") != "bon"
    diff = [
        f"{k} {old[k]!r} -> {new[k]!r}"
        for k in sorted(new)
        if old[k] != new[k] and not (k == "search.trajectories" and extendable)
    ]
    if diff:
        raise RstarError(
            f"--resume: {out} was written with other settings ({'; '.join(diff)}): resume with the same "
            "settings, or pass another --out"
        )


def prepare_run(
    problems: list, cfg: Config, out_dir: str | Path, resume: bool, extra: dict | None = None
) -> tuple[Path, list[Job], dict]:
    """Check OUT (an existing run needs `resume`), cut a partial last line off its tree file,
    write run.json; return (OUT, the jobs not yet done, versions)."""
    out = Path(out_dir)
    trees_path = out / "trees.jsonl"
    if trees_path.exists() and trees_path.stat().st_size and not resume:
        raise RstarError(
            f"{trees_path} already holds trees: pass --resume to continue that run, or another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        check_resume(out, cfg)
    done = open_for_resume(trees_path)
    jobs = make_jobs(problems, cfg, skip=done)
    vers = versions()
    (out / "run.json").write_text(
        json.dumps({"config": cfg.to_dict(), "versions": vers, "argv": sys.argv, **(extra or {})}, indent=2)
    )
    return out, jobs, vers
