"""Monte Carlo Tree Search over steps (paper section 3.1-3.2).

A rollout descends from the root by UCT among the open children (`tree.select_child`),
expanding each unexpanded node it reaches with n sampled steps, until it reaches a node with no
open child: typically the program's end, whose child is the final answer. What the new
children of an expansion are worth (`settle`):
- an answer backs its value up along its path, once: +1/-1 from the gold answer in data
  generation (terminal-guided annotation, rounds 1-4), its reward-model score at inference;
- an invalid terminal (code failed `error_threshold` times in a row, too deep, cut off, no
  boxed answer) holds -1 on itself alone and is never selected again: failed steps are pruned,
  so rollouts are not spent on them and their -1 does not flow through the parent (the
  authors' code; with the textbook +inf for unvisited children every failing sibling would
  otherwise get a rollout of its own);
- a new open node starts from its PPM value counted as one visit when q is PPM-initialised
  (rounds 3-4, and inference, where the PPM also ranks siblings before any visit).
So Q = q / N stays in [-1, 1] everywhere. The search ends after `rollouts` descents, or sooner
when the root has no open child left.
"""

from __future__ import annotations

import random

from rstar.config import SearchConfig
from rstar.search.expand import Search, SearchContext, expand, samples_for, terminal_value
from rstar.search.tree import ANSWER, Node, Tree, backup, is_open, select_child


def settle(tree: Tree, new: list[Node], cfg: SearchConfig, rollout: int) -> None:
    """Give the children of one expansion their initial values and back up new answers."""
    for child in new:
        if child.is_terminal:
            child.rollout = rollout  # lets evaluation reuse one search for every smaller budget
            if child.terminal == ANSWER:
                backup(tree, child, terminal_value(child, cfg))
            else:
                child.q, child.N = -1.0, 1  # pruned: its own value only
        elif cfg.ppm_init:
            child.q, child.N = float(child.value), 1  # q(s_i)^0 = PPM(x + s_1..s_i), one visit


def mcts(ctx: SearchContext) -> Search:
    cfg = ctx.cfg
    # Steps need reward-model values when q is PPM-initialised, and at inference, where the
    # answer's value is what gets backed up.
    score = cfg.ppm_init or not cfg.terminal_guided
    rng = random.Random(ctx.seed)
    tree = ctx.new_tree()
    for k in range(cfg.rollouts):
        if not is_open(tree, tree.root):
            break  # every branch ends in a terminal: nothing new to find
        node: Node | None = tree.root
        while node is not None:
            if not node.expanded:
                new = yield from expand(tree, ctx, [node], samples_for(node, cfg), score=score)
                settle(tree, new, cfg, k)
            node = select_child(tree, node, cfg.c_puct, cfg.unvisited, rng)
    return tree
