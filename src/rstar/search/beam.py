"""Step-level beam search with the reward model (paper section 4, the cheaper alternative).

Each step, every open trajectory in the beam is expanded with n samples; all new steps are
scored by the reward model and the best `beam_width` open ones form the next beam. Only answers
count as finished: a step whose code failed (a CODE_ERROR terminal), a cut-off step or one past
the depth limit leaves the beam and finishes nothing. The search stops when `beam_width`
answers exist or the beam is empty. Each child is attached to the node it was generated from
(the authors' implementation can attach steps to the wrong parent; here the parent is the node
whose prefix was the prompt).
"""

from __future__ import annotations

from rstar.search.expand import Search, SearchContext, expand, samples_for
from rstar.search.tree import ANSWER


def beam_search(ctx: SearchContext) -> Search:
    cfg = ctx.cfg
    tree = ctx.new_tree()
    beam = [tree.root]
    answers = 0
    while beam and answers < cfg.beam_width:
        new = yield from expand(tree, ctx, beam, [samples_for(n, cfg) for n in beam], score=True)
        answers += sum(1 for ch in new if ch.terminal == ANSWER)
        open_ = [ch for ch in new if not ch.is_terminal]
        open_.sort(key=lambda ch: ch.value, reverse=True)
        beam = open_[: cfg.beam_width]
    return tree
