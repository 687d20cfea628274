"""Monte Carlo Tree Search over steps (paper section 3.1-3.2).

Each rollout walks from the root by UCT, expanding every unexpanded node it reaches with
n sampled steps, until it reaches a terminal; the terminal's value is backed up along the
path. Data generation (ground truth known) backs up +1/-1 (terminal-guided annotation),
optionally on top of PPM-initialised q values (rounds 3-4). Inference (no ground truth)
scores every new step with the reward model and backs up the PPM value of the answer.
"""

from __future__ import annotations

import random

from rstar.search.expand import Search, SearchContext, expand, samples_for, terminal_value
from rstar.search.tree import backup, select_child


def mcts(ctx: SearchContext) -> Search:
    cfg = ctx.cfg
    # Steps need reward-model values when q is PPM-initialised, and at inference, where the
    # answer's value is what gets backed up.
    score = cfg.ppm_init or not cfg.terminal_guided
    rng = random.Random(ctx.seed)
    tree = ctx.new_tree()
    for k in range(cfg.rollouts):
        node = tree.root
        while not node.is_terminal:
            if not node.expanded:
                new = yield from expand(tree, ctx, [node], samples_for(node, cfg), score=score)
                if cfg.ppm_init:
                    for child in new:  # q(s_i)^0 = PPM(x + s_1..s_i)
                        child.q = child.value
            node = select_child(tree, node, cfg.c_puct, cfg.unvisited, rng)
        if node.rollout is None:
            node.rollout = k  # lets evaluation reuse one search for every smaller budget
        backup(tree, node, terminal_value(node, cfg))
    return tree
