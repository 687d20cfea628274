"""Search throughput: cross-problem batching vs one problem at a time, measured in one run.

Both runs search the same problems with the same MCTS budget (rollouts x samples) on the
same tiny HF policy; the only difference is `scheduler.max_inflight` (all problems vs 1).
Prints tree nodes per second for each, the speedup, and the share of the batched run's wall
time spent outside model calls (scheduling, tree work, sandbox and grading waits).

    python bench/search.py [--policy DIR] [--problems 32] [--rollouts 4] [--samples 4]

Without --policy it builds a tiny policy and pre-trains it for a few hundred steps on the
synthetic world's seed solutions, so that it writes multi-step solutions (a random model's
trees end after one step and would flatter nothing).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def quick_policy(out: Path, steps: int) -> Path:
    from rstar.config import TrainConfig
    from rstar.data.world import WorldConfig, make_split, seed_sft_records, tokenizer_corpus
    from rstar.models.tiny import build_tiny_policy
    from rstar.training.sft import train_sft

    world = WorldConfig()
    build_tiny_policy(out / "init", tokenizer_corpus(world, n=500), size="tiny", vocab_size=900)
    seed = seed_sft_records(make_split("train", {1: 300, 2: 300}, world, seed=1))
    cfg = TrainConfig(
        learning_rate=3e-3, epochs=100, batch_size=32, micro_batch_size=32, max_length=512, eval_fraction=0.0
    )
    train_sft(seed, out / "init", out / "policy", cfg, max_steps=steps)
    return out / "policy"


def run(cfg, policy, problems, inflight: int) -> dict:
    import dataclasses

    from rstar.search.jobs import make_jobs, open_backends
    from rstar.search.scheduler import run_jobs

    cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, max_inflight=inflight))
    with open_backends(cfg, policy=policy) as backends:
        backends.sandbox.run("print(1)")  # workers warm before the clock starts
        t0 = time.perf_counter()
        stats = run_jobs(make_jobs(problems, cfg), cfg, backends, lambda *a: None)
        wall = time.perf_counter() - t0
    return {
        "nodes": stats.nodes,
        "wall_s": wall,
        "model_s": stats.model_s,
        "tokens": stats.tokens,
        "calls": stats.model_calls,
        "solved": stats.solved,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", help="policy directory (default: build and briefly pre-train a tiny one)")
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    args = ap.parse_args()

    from rstar.config import load_config
    from rstar.data.world import WorldConfig, make_split
    from rstar.models.hf import HFPolicy

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.policy) if args.policy else quick_policy(Path(tmp), args.pretrain_steps)
        policy = HFPolicy(path, max_batch_size=128)
        per_level = max(1, args.problems // 4)
        problems = make_split("test", per_level, WorldConfig())[: args.problems]
        cfg = load_config(
            "round2",
            overrides=[
                f"search.rollouts={args.rollouts}",
                f"search.num_samples={args.samples}",
                "search.max_new_tokens=64",
                "search.temperature=1.0",
                "search.top_p=1.0",
            ],
        )
        batched = run(cfg, policy, problems, inflight=len(problems))
        single = run(cfg, policy, problems, inflight=1)
    for name, r in (("batched", batched), ("one-at-a-time", single)):
        print(
            f"{name:>14}: {r['nodes']} nodes in {r['wall_s']:.1f} s = {r['nodes'] / r['wall_s']:.1f} nodes/s, "
            f"{r['tokens'] / r['wall_s']:.0f} tok/s, {r['calls']} model calls, model {r['model_s']:.1f} s, "
            f"solved {r['solved']}/{len(problems)}"
        )
    speedup = (batched["nodes"] / batched["wall_s"]) / (single["nodes"] / single["wall_s"])
    non_model = 1 - batched["model_s"] / batched["wall_s"]
    print(f"batched_speedup={speedup:.2f} non_model_share={non_model:.3f}")


if __name__ == "__main__":
    main()
