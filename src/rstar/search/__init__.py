"""Deep-thinking search: MCTS, step beam search, best-of-N and greedy over one tree type,
driven by a scheduler that batches every search's model calls together."""

from rstar.search.beam import beam_search
from rstar.search.best_of_n import best_of_n, greedy
from rstar.search.mcts import mcts

SEARCHES = {"mcts": mcts, "beam": beam_search, "bon": best_of_n, "greedy": greedy}

__all__ = ["SEARCHES", "beam_search", "best_of_n", "greedy", "mcts"]
