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
    if cfg.parallel_rollouts > 1:
        return (yield from mcts_parallel(ctx))
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


def mcts_parallel(ctx: SearchContext) -> Search:
    """`mcts` with `cfg.parallel_rollouts` rollouts descending at once (AlphaZero's virtual
    loss), so that one search puts several nodes into each model call.

    Each walker descends by UCT from where it stands to the first unexpanded node; the distinct
    nodes reached are expanded in one batch and settled as in `mcts`. Every node a walker
    selects carries a virtual loss (one visit, value -1) until the walker's rollout ends, so
    that the other walkers prefer other branches; the loss is then taken back exactly (real
    backups of answers in between are additive and stay). The trees differ from sequential
    rollouts, so data generation keeps `parallel_rollouts=1`.
    """
    cfg = ctx.cfg
    score = cfg.ppm_init or not cfg.terminal_guided
    rng = random.Random(ctx.seed)
    tree = ctx.new_tree()
    started = 0
    walkers: list[tuple[int, Node, list[Node]]] = []  # (rollout, where it stands, virtual-loss path)
    while True:
        while len(walkers) < cfg.parallel_rollouts and started < cfg.rollouts and is_open(tree, tree.root):
            walkers.append((started, tree.root, []))
            started += 1
        if not walkers:
            break
        leaves: dict[int, tuple[Node, int]] = {}  # node id -> (node, rollout that expands it)
        going: list[tuple[int, Node, list[Node]]] = []
        for k, node, path in walkers:
            cur: Node | None = node
            while cur is not None and cur.expanded:
                cur = select_child(tree, cur, cfg.c_puct, cfg.unvisited, rng)
                if cur is not None:
                    cur.N += 1  # virtual loss
                    cur.q -= 1.0
                    path.append(cur)
            if cur is None:  # no open child: this rollout is over
                for n in path:
                    n.N -= 1
                    n.q += 1.0
                continue
            leaves.setdefault(cur.id, (cur, k))
            going.append((k, cur, path))
        walkers = going
        if not leaves:
            continue
        nodes = [n for n, _ in leaves.values()]
        new = yield from expand(tree, ctx, nodes, [samples_for(n, cfg) for n in nodes], score=score)
        for node, k in leaves.values():
            settle(tree, [c for c in new if c.parent == node.id], cfg, k)
    return tree
