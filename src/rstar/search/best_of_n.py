"""Best-of-N and greedy decoding: whole solutions sampled step by step, without search.

Solutions are still generated one step at a time, because each `<end_of_code>` needs the
executor's output before the answer is written. All N chains of a problem advance together
so that each step is one batched request. The reward model (when there is one) scores the
final answers; choosing among them is `best_answer_node` / the evaluation's job.
"""

from __future__ import annotations

from rstar.search.expand import Score, Search, SearchContext, expand
from rstar.search.tree import Tree


def sample_chains(ctx: SearchContext, n: int, temperature: float, score: bool) -> Search:
    tree = ctx.new_tree()
    # The first step is sampled n times at once (identical first steps stay separate chains,
    # so there are exactly n solutions); every chain then continues with 1 sample.
    frontier = yield from expand(tree, ctx, [tree.root], n, temperature=temperature, merge=False)
    while True:
        open_ = [node for node in frontier if not node.is_terminal]
        if not open_:
            break
        frontier = yield from expand(tree, ctx, open_, 1, temperature=temperature)
    if score:
        yield from score_answers(tree)
    return tree


def score_answers(tree: Tree) -> Search:
    answers = tree.answers()
    if answers:
        values = yield Score([tree.prefix(tree.nodes[a.parent]) for a in answers], [a.text for a in answers])
        for node, v in zip(answers, values):
            node.value = float(v)
    return tree


def best_of_n(ctx: SearchContext) -> Search:
    return (yield from sample_chains(ctx, ctx.cfg.trajectories, ctx.cfg.temperature, score=ctx.has_reward))


def greedy(ctx: SearchContext) -> Search:
    return (yield from sample_chains(ctx, 1, 0.0, score=ctx.has_reward))
