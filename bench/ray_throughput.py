"""Search throughput of the Ray runner with 1 and with 2 local worker actors, in one run.

Both settings run the same problems with the same tiny random Qwen2 policy on one local Ray
instance, one after the other, so the ratio holds even on a machine that other jobs slow down
(run it twice and compare if the machine is shared). Each actor has 1 CPU (Ray sets its
OMP_NUM_THREADS to 1), its own sandbox and grader processes and its own copy of the model.

Figures per setting: `searches/s` over the whole run (actor start-up and model loading
included: what a short run sees), `steady searches/s` from the moment every actor is up
(what a long run converges to), and the CPU cores the actors actually got in that time
(read from /proc): on a machine shared with other jobs, two actors may get far less than two
cores, and searches per actor CPU-second shows whether the work per search stayed the same.

    python bench/ray_throughput.py [--per-level 10] [--size tiny] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a local process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _spin(seconds: float, out) -> None:
    start, cpu0 = time.monotonic(), time.process_time()
    while time.monotonic() - start < seconds:
        pass
    out.put(time.process_time() - cpu0)


def free_cores(n: int, seconds: float = 2.0) -> float:
    """Cores that `n` busy processes get right now: on a shared machine, what 2 actors can hope for."""
    import multiprocessing as mp

    q = mp.Queue()
    procs = [mp.Process(target=_spin, args=(seconds, q)) for _ in range(n)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return round(sum(q.get() for _ in procs) / seconds, 2)


def run_one(actors: int, problems: list, cfg, out: Path) -> dict:
    from rstar.search.ray_runner import RayOptions, RayProgress, generate_ray

    marks: dict = {}
    cpu_at_up: dict[int, float] = {}
    cpu_last: dict[int, float] = {}

    def monitor(p: RayProgress) -> None:
        pids = [a.pid for a in p.actors if a.alive and a.pid]
        if "all_up" not in marks and p.ready >= actors:
            marks["all_up"] = (time.perf_counter(), p.done)
            cpu_at_up.update({pid: cpu_seconds(pid) or 0.0 for pid in pids})
        for pid in pids:
            cpu = cpu_seconds(pid)
            if cpu is not None:
                cpu_last[pid] = cpu

    t0 = time.perf_counter()
    stats = generate_ray(
        problems, cfg, out, options=RayOptions(actors=actors), show_progress=False, monitor=monitor
    )
    t1 = time.perf_counter()
    up_t, up_done = marks.get("all_up", (t0, 0))
    # The CPU the actors actually got after start-up: on a shared machine, 2 actors may get
    # much less than 2 cores (Ray also runs its workers at nice 15, below other users' jobs).
    actor_cpu = sum(cpu_last[pid] - cpu_at_up.get(pid, 0.0) for pid in cpu_last)
    steady_wall = t1 - up_t
    return {
        "actors": actors,
        "searches": stats.done,
        "wall_s": round(t1 - t0, 2),
        "startup_s": round(up_t - t0, 2),
        "searches_per_s": round(stats.done / (t1 - t0), 3),
        "steady_searches_per_s": round((stats.done - up_done) / (t1 - up_t), 3) if t1 > up_t else 0.0,
        "tokens_per_s": round(stats.tokens / (t1 - t0), 1),
        "actor_cores_used": round(actor_cpu / steady_wall, 2) if steady_wall > 0 else 0.0,
        "searches_per_actor_cpu_s": round((stats.done - up_done) / actor_cpu, 3) if actor_cpu else 0.0,
        "nodes": stats.nodes,
        "model_calls": stats.model_calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-level", type=int, default=10, help="problems per world level (4 levels)")
    ap.add_argument("--size", default="tiny", help="tiny-model preset (tiny, small, medium)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-inflight", type=int, default=8, help="searches batched together in an actor")
    args = ap.parse_args()

    import ray

    from rstar.config import load_config
    from rstar.data.world import WorldConfig, make_split
    from rstar.models.tiny import build_tiny_policy

    with tempfile.TemporaryDirectory(prefix="rstar-ray-bench-") as tmp:
        model = build_tiny_policy(Path(tmp) / "model", size=args.size)
        cfg = load_config(
            "round2",
            overrides=[
                f"model.policy={json.dumps(str(model))}",
                "model.device=cpu",
                f"search.rollouts={args.rollouts}",
                f"search.num_samples={args.num_samples}",
                f"search.max_new_tokens={args.max_new_tokens}",
                f"scheduler.max_inflight={args.max_inflight}",
                "sandbox.workers=1",
            ],
        )
        problems = make_split("test", args.per_level, WorldConfig())
        probe = {"free_cores_1_proc": free_cores(1), "free_cores_2_procs": free_cores(2)}
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            rows = [run_one(n, problems, cfg, Path(tmp) / f"out{n}") for n in (1, 2)]
        finally:
            ray.shutdown()
    print(json.dumps(probe))
    for row in rows:
        print(json.dumps(row))
    one, two = rows
    print(
        f"1 actor: {one['searches_per_s']:.3f} searches/s ({one['steady_searches_per_s']:.3f} steady); "
        f"2 actors: {two['searches_per_s']:.3f} searches/s ({two['steady_searches_per_s']:.3f} steady); "
        f"speed-up {two['searches_per_s'] / one['searches_per_s']:.2f}x "
        f"({two['steady_searches_per_s'] / max(one['steady_searches_per_s'], 1e-9):.2f}x steady)"
    )
    print(
        f"cores the actors got: {one['actor_cores_used']:.2f} (1 actor), {two['actor_cores_used']:.2f} "
        f"(2 actors); searches per actor CPU-second: {one['searches_per_actor_cpu_s']:.3f}, "
        f"{two['searches_per_actor_cpu_s']:.3f}; 2 busy processes got {probe['free_cores_2_procs']:.2f} cores "
        "before the run"
    )


if __name__ == "__main__":
    main()
