"""A toy PPM that a tiny model learns in about a second: separable step pairs (the positive
step says `good`, the negative `bad`; the rest is noise). Shared by test_ppm (which checks the
training and scoring) and test_search (where it drives a real MCTS and beam search)."""

from __future__ import annotations

import random

from rstar import steps
from rstar.config import TrainConfig


def toy_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        head = (
            f"\n{steps.ASSISTANT_HEADER}{steps.CODE_OPEN}\n# Step 1: add\nx = {a} + {b}\n{steps.END_OF_STEP}"
        )
        recs.append(
            {
                "prompt": steps.ppm_prompt(f"Problem {i}: what is {a} + {b} times {rng.randint(2, 9)}?"),
                "pos": head + f"\n\n# Step 2: good\ny = x * {a}\n{steps.END_OF_STEP}",
                "neg": head + f"\n\n# Step 2: bad\ny = x * {b}\n{steps.END_OF_STEP}",
                "pos_count": 2,
                "neg_count": 2,
            }
        )
    return recs


TOY_CFG = TrainConfig(
    learning_rate=3e-3,
    epochs=3,
    batch_size=8,
    micro_batch_size=8,
    max_length=256,
    warmup_ratio=0.0,
    eval_fraction=0.25,
    logging_steps=5,
)
