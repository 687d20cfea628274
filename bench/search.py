"""What a round's search costs: the embedded preset's round-1 search, new path against old.

Runs the embedded preset's round-1 search (`load_config("embedded")` + `evolve.round_config(cfg, 1)`:
terminal-guided MCTS, its rollouts, samples, temperature and token limit) over world training
problems (levels in the preset's proportions), once per engine and size, each run in a
subprocess of its own (so that peak RSS is the run's own), and prints for each:

- `search_tok_s`: generated tokens / wall time of the search;
- `raw_tok_s`: the same engine on the same generate calls, replayed alone (no sandbox, no
  grading, no tree work); `search_efficiency=` search_tok_s / raw_tok_s;
- `prefix_per_gen`: prompt tokens encoded per generated token with the prefix cache and,
  from the replay with the cache off, without it (engine only);
- `problems_per_min`, `solved`; the shares of wall time outside model calls (`non_model`),
  blocked on the sandbox (`sandbox_wait`) and on grading (`grading_wait`); `batch_fullness`
  (searches in a model call / searches in flight); wall time and peak RSS.

With `--actors N`, also the new path on N Ray actors of a Ray instance started for the run
(`rstar evolve`'s `evolve.search_actors`: one search process per core), Ray's start included
in its wall time; the line gives its wall time, problems/min, solved and tokens (the actors'
model time is summed over them, so it has no non-model share).

With `--inference`, also MCTS + PPM and best-of-N + PPM at inference (test problems, a PPM
built from the policy with a fresh value head: its values are noise, the token cost is real),
same number of samples per problem, generated tok/s of each.

    python bench/search.py [--policy DIR] [--sizes 128,512] [--engines hf,auto] [--actors 2] [--inference]

Without --policy it builds a tiny policy and pre-trains it for a few hundred steps on the
synthetic world's seed solutions (`quick_policy`), so that it writes multi-step solutions.
Yardstick: `raw_tok_s` of the old path (HF generate) in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
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


class Recorder:
    """A policy wrapper that keeps every generate call's requests for the replay."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.calls: list = []

    def generate(self, requests):
        self.calls.append(list(requests))
        return self.policy.generate(requests)


def problems_for(n: int, split: str = "train", seed: int = 7) -> list:
    """n world problems, levels in the embedded preset's round-1 proportions (5:15:35:35)."""
    from rstar.data.world import WorldConfig, make_split

    weights = [5, 15, 35, 35]
    counts = {lv + 1: -(-n * w // sum(weights)) for lv, w in enumerate(weights)}
    return make_split(split, counts, WorldConfig(), seed=seed)[:n]


def round1_config(engine: str, mode: str | None = None, threads: int = 0):
    import dataclasses

    from rstar.config import load_config
    from rstar.evolve import round_config

    cfg = round_config(load_config("embedded"), 1)
    model = dataclasses.replace(cfg.model, engine=engine, cpu_threads=threads or cfg.model.cpu_threads)
    cfg = dataclasses.replace(cfg, model=model)
    if mode is not None:  # inference: no gold answer is used, PPM values steer and settle
        search = dataclasses.replace(cfg.search, mode=mode, terminal_guided=False, ppm_init=True)
        cfg = dataclasses.replace(cfg, search=search)
    return cfg


def replay(policy_dir: str, engine: str, calls: list, prefix_cache_mb: int, cpu_threads: int) -> dict:
    """The recorded generate calls through a fresh policy of the same engine, timed alone."""
    import torch

    from rstar.models.hf import HFPolicy

    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    policy = HFPolicy(policy_dir, max_batch_size=128, engine=engine, prefix_cache_mb=prefix_cache_mb)
    t0 = time.perf_counter()
    for reqs in calls:
        policy.generate(reqs)
    wall = time.perf_counter() - t0
    out = {"tokens": policy.tokens_generated, "wall_s": wall, "tok_s": policy.tokens_generated / wall}
    if policy.engine is not None:
        e = policy.engine
        out["prefix_encoded"] = e.prefix_tokens_encoded
        out["prefix_reused"] = e.prefix_tokens_reused
    return out


def ray_worker(args) -> dict:
    """One search run on `args.actors` Ray actors (started here): prints one JSON line."""
    import dataclasses

    from rstar.search.ray_runner import RayOptions
    from rstar.search.run import generate

    cfg = round1_config(args.engine, None, args.threads)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, policy=args.policy))
    problems = problems_for(args.problems)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # prefetch as `rstar evolve` sets it: the last searches do not queue in one actor
        stats = generate(
            problems, cfg, tmp, ray=RayOptions(actors=args.actors, prefetch=8), show_progress=False
        )
        wall = time.perf_counter() - t0
    res = {
        "engine": f"{args.engine}+ray{args.actors}",
        "mode": args.mode,
        "problems": len(problems),
        "solved": stats.solved,
        "nodes": stats.nodes,
        "tokens": stats.tokens,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(res), flush=True)
    return res


def worker(args) -> dict:
    """One search run (and its replays) in this process: prints one JSON line."""
    if args.actors:
        return ray_worker(args)
    from rstar.models import load_policy, load_reward
    from rstar.search.jobs import make_jobs, open_backends
    from rstar.search.scheduler import run_jobs

    mode = args.mode if args.mode != "round1" else None
    cfg = round1_config(args.engine, mode, args.threads)
    import dataclasses

    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, policy=args.policy, ppm=args.ppm or "")
    )
    if args.mode == "mcts":
        search = dataclasses.replace(cfg.search, rollouts=args.rollouts, parallel_rollouts=args.parallel)
        cfg = dataclasses.replace(cfg, search=search)
    elif args.mode == "bon":  # as many solutions as MCTS has rollouts x samples per expansion
        search = dataclasses.replace(cfg.search, trajectories=args.rollouts * cfg.search.num_samples)
        cfg = dataclasses.replace(cfg, search=search)
    problems = problems_for(args.problems, "test" if mode else "train")
    policy = Recorder(load_policy(cfg.model))
    # the reward model's engine may differ from the policy's: old vs new PPM scoring, same search
    rcfg = dataclasses.replace(cfg.model, engine=args.reward_engine or cfg.model.engine)
    reward = load_reward(rcfg) if args.ppm else None
    with open_backends(cfg, policy=policy, reward=reward) as backends:
        backends.sandbox.run("print(1)")  # workers warm before the clock starts
        t0 = time.perf_counter()
        stats = run_jobs(make_jobs(problems, cfg), cfg, backends, lambda *a: None)
        wall = time.perf_counter() - t0
    inner = policy.policy
    res = {
        "engine": args.engine,
        "mode": args.mode,
        "problems": len(problems),
        "solved": stats.solved,
        "failed": stats.failed,
        "nodes": stats.nodes,
        "tokens": stats.tokens,
        "wall_s": wall,
        "model_s": stats.model_s,
        "policy_s": inner.model_seconds,
        "model_calls": stats.model_calls,
        "sandbox_wait_s": stats.sandbox_wait_s,
        "grading_wait_s": stats.grading_wait_s,
        "batch_fullness": stats.call_searches / max(1, stats.call_inflight),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if reward is not None:
        res["reward_s"] = reward.model_seconds
        res["reward_texts"] = reward.texts_scored
        res["reward_tokens"] = reward.tokens_scored  # tokens run through the reward model
    if inner.engine is not None:
        e = inner.engine
        res["prefix_encoded"] = e.prefix_tokens_encoded
        res["prefix_reused"] = e.prefix_tokens_reused
        res["useful_row_share"] = e.tokens_generated / max(1, e.row_steps + e.sequences)
    if args.replay:
        res["replay"] = replay(
            args.policy, args.engine, policy.calls, cfg.model.prefix_cache_mb, cfg.model.cpu_threads
        )
        if inner.engine is not None:
            res["replay_nocache"] = replay(args.policy, args.engine, policy.calls, 0, cfg.model.cpu_threads)
    print("RESULT " + json.dumps(res), flush=True)
    return res


def launch(args, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--policy", args.policy]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            cmd.append(flag)
        elif v not in (None, False):
            cmd += [flag, str(v)]
    cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"worker failed: {' '.join(cmd)}")
    res = json.loads(line[-1][len("RESULT ") :])
    res["process_s"] = time.perf_counter() - t0
    return res


def report(r: dict) -> str:
    wall, tok = r["wall_s"], r["tokens"]
    parts = [
        f"{r['mode']:>6} engine={r['engine']:<4} problems={r['problems']:<4}",
        f"solved={r['solved']}/{r['problems']}",
        f"problems_per_min={60 * r['problems'] / wall:.1f}",
        f"wall_s={wall:.1f}",
        f"search_tok_s={tok / wall:.0f}",
    ]
    if "model_s" not in r:  # a Ray run: the driver's RSS is not the actors'
        return " ".join(parts)
    parts.append(f"peak_rss_mb={r['peak_rss_mb']:.0f}")
    if "replay" in r:
        raw = r["replay"]["tok_s"]
        parts += [f"raw_tok_s={raw:.0f}", f"search_efficiency={tok / wall / raw:.2f}"]
    parts += [
        f"non_model={1 - r['model_s'] / wall:.3f}",
        f"sandbox_wait={r['sandbox_wait_s'] / wall:.3f}",
        f"grading_wait={r['grading_wait_s'] / wall:.3f}",
        f"batch_fullness={r['batch_fullness']:.2f}",
        f"calls={r['model_calls']}",
    ]
    if "prefix_encoded" in r:
        parts.append(f"prefix_per_gen={r['prefix_encoded'] / max(1, tok):.3f}")
        if "replay_nocache" in r:
            nc = r["replay_nocache"]
            parts.append(f"prefix_per_gen_nocache={nc['prefix_encoded'] / max(1, nc['tokens']):.3f}")
            parts.append(f"raw_tok_s_nocache={nc['tok_s']:.0f}")
        parts.append(f"useful_row_share={r['useful_row_share']:.2f}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", help="policy directory (default: build and briefly pre-train a tiny one)")
    ap.add_argument("--sizes", default="128,512", help="problem counts, comma-separated")
    ap.add_argument("--engines", default="hf,auto", help="model.engine values: hf (old path), auto (new)")
    ap.add_argument("--inference", action="store_true", help="also MCTS + PPM and best-of-N + PPM")
    ap.add_argument("--inference-problems", type=int, default=64)
    ap.add_argument("--parallel-rollouts", type=int, default=4, help="MCTS + PPM with this many at once too")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--actors", type=int, default=0, help="also the new path on this many Ray actors")
    ap.add_argument(
        "--no-replay",
        action="store_true",
        help="skip the raw (replayed) figures (run at the first size only)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="model.cpu_threads for every run (0 = the preset's 2). On a 2-core machine shared with other "
        "work, 2 torch threads ran the round-1 search 15x slower than 1 (8 problems: 132 s vs 8.8 s)",
    )
    # worker options
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="round1", help=argparse.SUPPRESS)
    ap.add_argument("--problems", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--rollouts", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--ppm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--reward-engine", default="", help=argparse.SUPPRESS)
    ap.add_argument("--replay", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if not args.policy:
            args.policy = str(quick_policy(Path(tmp), args.pretrain_steps))
        sizes = [int(x) for x in args.sizes.split(",") if x]
        engines = [x for x in args.engines.split(",") if x]
        results = []
        for n in sizes:
            for eng in engines:
                r = launch(args, engine=eng, problems=n, replay=not args.no_replay and n == sizes[0])
                results.append(r)
                print(report(r), flush=True)
            if args.actors:
                r = launch(args, engine=engines[-1], problems=n, actors=args.actors)
                print(report(r), flush=True)
                one = next(x for x in results if x["engine"] == engines[-1] and x["problems"] == n)
                print(
                    f"problems={n} actors={args.actors} speedup_problems_per_min_over_one_process="
                    f"{one['wall_s'] / r['wall_s']:.2f}"
                    + "".join(
                        f" over_{x['engine']}={x['wall_s'] / r['wall_s']:.2f}"
                        for x in results
                        if x["problems"] == n and x["engine"] != engines[-1]
                    ),
                    flush=True,
                )
        by = {(r["engine"], r["problems"]): r for r in results}
        for n in sizes:
            if all((e, n) in by for e in ("hf", "auto")):
                old, new = by[("hf", n)], by[("auto", n)]
                print(
                    f"problems={n} speedup_problems_per_min={old['wall_s'] / new['wall_s']:.2f} "
                    f"solved hf={old['solved']} auto={new['solved']}"
                )
        for eng in engines:
            if all((eng, n) in by for n in sizes) and len(sizes) > 1:
                a, b = by[(eng, sizes[0])], by[(eng, sizes[-1])]
                print(
                    f"engine={eng} scaling {sizes[0]}->{sizes[-1]}: wall x{b['wall_s'] / a['wall_s']:.2f} "
                    f"(problems x{sizes[-1] / sizes[0]:.1f}), peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}"
                )
        if args.inference:
            ppm = Path(tmp) / "ppm"
            make_ppm(args.policy, ppm)
            inf = {}
            for mode, par in (("bon", 1), ("mcts", 1), ("mcts", args.parallel_rollouts)):
                r = launch(
                    args,
                    engine=engines[-1],
                    problems=args.inference_problems,
                    mode=mode,
                    ppm=str(ppm),
                    parallel=par,
                )
                inf[(mode, par)] = r
                print(f"parallel_rollouts={par} " + report(r), flush=True)
            # the same MCTS + PPM search with the reward model on its old path (one forward of
            # each whole text): what the reward engine's prefix cache buys
            old = launch(
                args,
                engine=engines[-1],
                problems=args.inference_problems,
                mode="mcts",
                ppm=str(ppm),
                parallel=1,
                reward_engine="hf",
            )
            new = inf[("mcts", 1)]
            print(
                f"reward engine hf vs {engines[-1]}, MCTS + PPM: wall {old['wall_s']:.1f} / {new['wall_s']:.1f} s "
                f"(x{old['wall_s'] / new['wall_s']:.2f}), reward model {old['reward_s']:.1f} / "
                f"{new['reward_s']:.1f} s (x{old['reward_s'] / max(1e-9, new['reward_s']):.2f}), tokens encoded "
                f"per scored text {old['reward_tokens'] / max(1, old['reward_texts']):.1f} / "
                f"{new['reward_tokens'] / max(1, new['reward_texts']):.1f}, solved {old['solved']} / {new['solved']}",
                flush=True,
            )
            b = inf[("bon", 1)]["tokens"] / inf[("bon", 1)]["wall_s"]
            for (mode, par), r in inf.items():
                if mode == "mcts":
                    m = r["tokens"] / r["wall_s"]
                    print(
                        f"inference parallel_rollouts={par} mcts_ppm_tok_s={m:.0f} bon_ppm_tok_s={b:.0f} "
                        f"ratio={m / b:.2f} solved mcts={r['solved']} bon={inf[('bon', 1)]['solved']}"
                    )


def make_ppm(policy: str, out: Path) -> None:
    """A PPM directory from the policy with a random value head: its values are noise (the
    searches' token costs are what is measured), but they differ, so ranking is not all ties."""
    import torch

    from rstar.models.ppm import init_reward_model

    model, tok = init_reward_model(policy)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    main()
