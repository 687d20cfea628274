"""The policy backend alone: the decode engine against HF `generate`, side by side.

The workload of the project's CPU engine comparison (docs/EXPERIMENTS.md, Search speed): world test problems, each prompt extended by 0-4
reference steps (deeper nodes), n samples per request at T=1.0, at most 64 new tokens,
stop at the step tags. Each repetition uses prompts no engine has seen (so the prefix cache
cannot hit across repetitions), the engine order rotates, and ratios are per repetition.

    python bench/engine.py --policy DIR [--prompts 64] [--reps 5] [--samples 4]
"""

from __future__ import annotations

import argparse
import statistics
import time


def workload(reps: int, n_prompts: int, seed: int = 0) -> list[list[str]]:
    import random

    from rstar import steps
    from rstar.data.world import WorldConfig, make_split

    rng = random.Random(seed)
    problems = make_split("test", {lv: reps * n_prompts for lv in (1, 2, 3, 4)}, WorldConfig(), seed=seed)
    rng.shuffle(problems)
    sets = []
    for r in range(reps):
        prompts = []
        for p in problems[r * n_prompts : (r + 1) * n_prompts]:
            ref = steps.split_steps(p.meta["solution"])
            k = rng.randint(0, min(4, max(0, len(ref) - 1)))
            prompts.append(steps.build_prompt(p.question, "sft") + "".join(ref[:k]))
        sets.append(prompts)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    import torch

    from rstar.models.base import GenRequest
    from rstar.models.hf import HFPolicy
    from rstar.steps import STOP_STRINGS

    if args.threads:
        torch.set_num_threads(args.threads)
    engines = {
        "hf": HFPolicy(args.policy, max_batch_size=128, engine="hf"),
        "engine": HFPolicy(args.policy, max_batch_size=128, engine="fast"),
    }
    names = list(engines)
    sets = workload(args.reps + 1, args.prompts)
    tps: dict[str, list[float]] = {k: [] for k in names}
    ratios = []
    for rep, prompts in enumerate(sets):
        reqs = [
            GenRequest(
                p,
                n=args.samples,
                max_new_tokens=args.max_new,
                temperature=1.0,
                top_p=1.0,
                stop=list(STOP_STRINGS),
                seed=i,
            )
            for i, p in enumerate(prompts)
        ]
        order = names[rep % 2 :] + names[: rep % 2]
        got = {}
        for name in order:
            pol = engines[name]
            pol.reset_counters()
            t0 = time.perf_counter()
            pol.generate(reqs)
            got[name] = pol.tokens_generated / (time.perf_counter() - t0)
        if rep == 0:
            continue  # warm-up
        for k in names:
            tps[k].append(got[k])
        ratios.append(got["engine"] / got["hf"])
        print(
            f"rep {rep}: " + " ".join(f"{k}={got[k]:.0f} tok/s" for k in order) + f" ratio={ratios[-1]:.2f}"
        )
    e = engines["engine"].engine
    print(
        " ".join(f"{k}_tok_s={statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for k, v in tps.items())
        + f" engine_over_hf={statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        + f" useful_row_share={e.tokens_generated / max(1, e.row_steps + e.sequences):.2f}"
    )


if __name__ == "__main__":
    main()
