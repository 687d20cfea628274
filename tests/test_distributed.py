"""The Ray runner on a local Ray cluster (2 CPU workers): the same tree file as one machine,
the CLI with the tiny HF model, an actor killed mid-run, and the driver killed and resumed.

One Ray instance serves the whole module (starting Ray takes 5-20 s on a busy 2-core
machine); the driver-kill test runs its drivers as subprocesses that join it by address.
Run as a script, this file is that subprocess driver:

    python tests/test_distributed.py OUT N_PROBLEMS RAY_ADDRESS [--resume]
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from helpers.killing import run_until_then_kill  # noqa: E402
from rstar.config import load_config  # noqa: E402
from rstar.data.problems import Problem  # noqa: E402
from rstar.search.ray_runner import (  # noqa: E402
    RayOptions,
    RayProgress,
    actor_resources,
    generate_ray,
    ray_options_from_args,
)
from scripted import ScriptedPolicy  # noqa: E402

# End to end on a local Ray cluster: `pytest -m "not slow"` skips it (`make test` runs it).
pytestmark = pytest.mark.slow

# Small searches: 3 rollouts x 3 samples of "What is A + B?" take a few model calls each.
OVERRIDES = ["search.rollouts=3", "search.num_samples=3", "scheduler.max_inflight=4", "sandbox.workers=1"]


def problems(k: int) -> list[Problem]:
    return [
        Problem(
            id=f"add:{i}", question=f"What is {10 + i} + {20 + 3 * i}?", answer=str(30 + 4 * i), source="add"
        )
        for i in range(k)
    ]


def keys(path: Path) -> list[str]:
    """Keys of the complete lines of a tree file, duplicates kept."""
    return [json.loads(line)["key"] for line in path.read_bytes().split(b"\n")[:-1] if line.strip()]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray cluster with 2 CPUs (2 single-CPU actors), shared by the module. Ray workers
    inherit PYTHONPATH from the process that starts Ray, so they can import `scripted`."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p))
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=100 * 2**20,
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def test_ray_output_equals_a_single_machine_run(ray_address, tmp_path):
    """Same problems, same config: every record is the one a single-machine run writes (the
    scripted policy's choices depend only on each request's seed), apart from timings."""
    from rstar.search.jobs import open_backends
    from rstar.search.run import generate

    cfg = load_config("round2", overrides=OVERRIDES)
    probs = problems(8)
    seen: list[RayProgress] = []
    stats = generate_ray(
        probs,
        cfg,
        tmp_path / "ray",
        options=RayOptions(actors=2),
        policy_factory=ScriptedPolicy,
        show_progress=False,
        monitor=seen.append,
    )
    with open_backends(cfg, policy=ScriptedPolicy()) as backends:
        generate(probs, cfg, tmp_path / "local", backends=backends, show_progress=False)

    def load(run: str) -> dict[str, dict]:
        out = {}
        for line in (tmp_path / run / "trees.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rec["stats"].pop("seconds")
            out[rec["key"]] = rec
        return out

    ray_recs, local_recs = load("ray"), load("local")
    assert sorted(ray_recs) == sorted(local_recs) == sorted(f"add:{i}#0" for i in range(8))
    for key, rec in ray_recs.items():
        assert rec == local_recs[key], key
    assert stats.done == 8 and stats.deaths == 0 and stats.duplicates == 0 and stats.actors == 2
    final = seen[-1]
    assert final.done == 8 and final.ready == 2
    # Both actors started and served; between them they did every job. (Which one takes how
    # many is up to timing: a fast first actor may take them all.)
    assert len(final.actors) == 2 and sum(a.done for a in final.actors) == 8
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["ray"]["actors"] == 2


def test_cli_generate_and_eval_with_the_tiny_model(ray_address, tmp_path, tiny_dir):
    """`rstar generate --ray` and `rstar eval --ray` with a tiny random Qwen2 in each actor
    (this process is connected to Ray already, so `--ray` uses that connection)."""
    from rstar.cli import main
    from rstar.search.tree import Tree

    model = tiny_dir  # the session's random tiny policy (read only)
    pfile = tmp_path / "problems.jsonl"
    pfile.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems(6)))
    common = ["--set", "search.max_new_tokens=8", "--set", "model.device=cpu", "--set", "sandbox.workers=1"]
    rc = main(
        [
            "generate",
            "--problems",
            str(pfile),
            "--out",
            str(tmp_path / "gen"),
            "--policy",
            str(model),
            "--set",
            "search.rollouts=2",
            "--set",
            "search.num_samples=2",
            *common,
            "--ray",
            "--ray-actors",
            "2",
        ]
    )
    assert rc == 0
    trees = tmp_path / "gen" / "trees.jsonl"
    assert sorted(keys(trees)) == sorted(f"add:{i}#0" for i in range(6))
    for line in trees.read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) >= {"key", "problem", "search_index", "seed", "mode", "answer", "correct", "stats"}
        assert rec["config"]["model"]["policy"] == str(model.resolve())
        tree = Tree.from_dict(rec["tree"])
        assert tree.to_dict() == rec["tree"]
        # the search ran: the root was expanded with at most search.num_samples=2 children
        assert tree.root.expanded and 1 <= len(tree.root.children) <= 2
        assert all(n.parent is not None and n.id in tree.nodes[n.parent].children for n in tree.nodes[1:])

    rc = main(
        [
            "eval",
            "--benchmark",
            str(pfile),
            "--policy",
            str(model),
            "--mode",
            "greedy",
            "--trajectories",
            "1",
            "--out",
            str(tmp_path / "eval"),
            *common,
            "--ray",
            "--ray-actors",
            "1",
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["runs"]["greedy"]["metrics"]["1"]["n"] == 6
    assert sorted(keys(tmp_path / "eval" / "greedy" / "trees.jsonl")) == sorted(
        f"add:{i}#0" for i in range(6)
    )


def test_evolve_searches_on_actors_give_the_trees_of_one_process(ray_address, tmp_path, tiny_dir):
    """`evolve.search_actors`: a last round (its main search, then an extra pass over the
    problems it left unsolved) on 2 actors writes the same trees as in this process."""
    import dataclasses

    from rstar import evolve
    from rstar.search.treefile import iter_records

    model = tiny_dir  # the session's random tiny policy (read only)
    base = load_config(
        "quick",
        overrides=[
            "search.max_new_tokens=8",
            "sandbox.workers=1",
            "evolve.unsolved_rollouts=[2]",
            "evolve.unsolved_seeds=1",
        ],
    )
    last = len(base.evolve.rounds)
    out = {}
    for actors in (2, 0):
        run = tmp_path / f"actors{actors}"
        evolve.write_problems(run / "problems" / "train.jsonl", problems(4))
        cfg = dataclasses.replace(base, evolve=dataclasses.replace(base.evolve, search_actors=actors))
        evolve.generate_round(cfg, run, last, str(model), "")
        out[actors] = {
            part: {
                rec["key"]: rec["tree"] for rec in iter_records(run / f"round{last}" / part / "trees.jsonl")
            }
            for part in (".", "extra1")
        }
        assert json.loads((run / f"round{last}" / "run.json").read_text()).get("ray", {}).get("actors") == (
            actors or None
        )
    # a random policy solves nothing, so the extra pass searches every problem again
    assert sorted(out[0]["extra1"]) == sorted(out[0]["."]) == sorted(f"add:{i}#0" for i in range(4))
    assert out[2] == out[0]


def test_killed_actor_loses_nothing_and_repeats_nothing(ray_address, tmp_path):
    """SIGKILL one actor's process mid-run: its unfinished searches go to the other actor or
    its replacement, and the tree file holds every search exactly once."""
    cfg = load_config("round2", overrides=[*OVERRIDES, "scheduler.max_inflight=2"])
    n = 16
    killed: list[int] = []

    def monitor(p: RayProgress) -> None:
        if killed or p.done < 3:
            return
        victims = [a for a in p.actors if a.alive and a.ready and a.outstanding and a.pid]
        if victims:
            killed.append(victims[0].pid)
            os.kill(victims[0].pid, signal.SIGKILL)  # an OOM kill looks the same to Ray

    stats = generate_ray(
        problems(n),
        cfg,
        tmp_path,
        options=RayOptions(actors=2, max_replacements=1),
        policy_factory=functools.partial(ScriptedPolicy, delay_s=0.05),  # slow: the kill lands mid-run
        show_progress=False,
        monitor=monitor,
    )
    assert killed, "the run ended before an actor could be killed"
    written = keys(tmp_path / "trees.jsonl")
    assert Counter(written) == Counter(f"add:{i}#0" for i in range(n))  # every search exactly once
    assert stats.deaths == 1 and stats.replacements == 1 and stats.requeued >= 1
    assert stats.done == n and stats.failed == 0


def test_killed_driver_resumes_without_loss_or_repeats(ray_address, tmp_path):
    """kill -9 the driver (its actors die with it), then resume: every search exactly once,
    and what was written before the kill is kept as it was."""
    out = tmp_path / "run"
    trees = out / "trees.jsonl"
    n = 16
    cmd = [sys.executable, __file__, str(out), str(n), ray_address]
    run_until_then_kill(cmd, lambda: trees.exists() and len(keys(trees)) >= 3, timeout_s=150)
    before = keys(trees)
    assert 3 <= len(before) < n, "kill -9 should land mid-run"

    subprocess.run([*cmd, "--resume"], check=True, timeout=300)
    after = keys(trees)
    assert Counter(after) == Counter(f"add:{i}#0" for i in range(n))
    assert after[: len(before)] == before
    assert trees.read_bytes().endswith(b"\n")


class BrokenPolicy:
    """A backend that fails outright (a CUDA error, a dead server): the actor is unusable."""

    def generate(self, requests):
        raise RuntimeError("simulated CUDA error")


def test_failing_actors_are_replaced_a_bounded_number_of_times(ray_address, tmp_path):
    from rstar import RstarError

    cfg = load_config("round2", overrides=OVERRIDES)
    with pytest.raises(RstarError, match="(?s)every Ray actor died.*simulated CUDA error"):
        generate_ray(
            problems(4),
            cfg,
            tmp_path,
            options=RayOptions(actors=1, max_replacements=1),
            policy_factory=BrokenPolicy,
            show_progress=False,
        )
    assert not (tmp_path / "trees.jsonl").exists() or keys(tmp_path / "trees.jsonl") == []


def test_actor_count_and_flags():
    cfg = load_config("round2")
    assert actor_resources(RayOptions(), cfg, {"CPU": 8.0}) == (8, 0.0, 1.0)
    assert actor_resources(RayOptions(), cfg, {"CPU": 64.0, "GPU": 8.0}) == (8, 1.0, 1.0)
    assert actor_resources(RayOptions(gpus_per_actor=2), cfg, {"CPU": 64.0, "GPU": 8.0})[0] == 4
    remote = load_config("round2", overrides=["model.backend=openai"])
    assert actor_resources(RayOptions(), remote, {"CPU": 4.0, "GPU": 8.0}) == (4, 0.0, 1.0)
    on_cpu = load_config("round2", overrides=["model.device=cpu"])
    assert actor_resources(RayOptions(), on_cpu, {"CPU": 4.0, "GPU": 8.0}) == (4, 0.0, 1.0)
    assert actor_resources(RayOptions(actors=3), cfg, {"CPU": 1.0}) == (3, 0.0, 1.0)

    import argparse

    from rstar.search.ray_runner import add_ray_arguments

    parser = argparse.ArgumentParser()
    add_ray_arguments(parser)
    assert ray_options_from_args(parser.parse_args([])) is None
    assert ray_options_from_args(parser.parse_args(["--ray"])).address == "local"
    opts = ray_options_from_args(parser.parse_args(["--ray", "auto", "--ray-actors", "4"]))
    assert opts.address == "auto" and opts.actors == 4


if __name__ == "__main__":  # the subprocess driver of test_killed_driver_resumes_without_loss_or_repeats
    out_dir, n_problems, address = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    generate_ray(
        problems(n_problems),
        load_config("round2", overrides=[*OVERRIDES, "scheduler.max_inflight=2"]),
        out_dir,
        resume="--resume" in sys.argv,
        options=RayOptions(address=address, actors=2),
        policy_factory=functools.partial(ScriptedPolicy, delay_s=0.05),
        show_progress=False,
    )
