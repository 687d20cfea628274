"""The search tree: nodes are steps, edges are "this step follows that prefix".

One `Tree` per search. Nodes live in a flat list and refer to each other by index, so a
tree is a plain JSON object in tree files (docs/TREE_FILES.md) and loads back unchanged.

Values (paper section 3.1-3.2, and the authors' rstar_deepthink/agents/mcts.py):
- `q` accumulates the values backed up through the node and `N` counts them, so `Q = q / N`
  stays in [-1, 1]. Each answer terminal backs its value up once, along its path, when it is
  created: +1/-1 from the gold answer in data generation, its reward-model score at inference.
- With PPM-augmented annotation a new non-terminal node starts at `q = PPM(x + s_1..s_i)` and
  `N = 1`: the initial value counts as one visit (the authors' code), and it is the node's own,
  not backed up through its parent.
- An invalid terminal (failed code, too deep, cut off, an answer with no boxed answer) holds -1 on
  itself alone (`q = -1`, `N = 1`) and is never selected: failed steps are pruned, so no
  rollout is spent on them and no -1 flows through their parent;
- `value` is the reward model's score of the node's prefix when one was computed.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

# Why a node is terminal. Only ANSWER can be correct; all others are worth -1.
ANSWER = "answer"
CODE_ERROR = "code_error"  # consecutive code errors reached the threshold
TOO_DEEP = "too_deep"  # depth limit reached without an answer
TRUNCATED = "truncated"  # the step hit the token limit or end of sequence without a tag
NO_ANSWER = "no_answer"  # an answer step without a \boxed{} answer


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int  # root = 0; a node at depth d holds the d-th step
    text: str  # the step as generated; a code_end step also holds its <output> block
    kind: str = "root"  # root | code | code_end | answer | partial
    children: list[int] = field(default_factory=list)
    N: int = 0
    q: float = 0.0
    value: float | None = None  # reward-model score of prompt + steps up to here
    terminal: str | None = None  # None or one of ANSWER, CODE_ERROR, TOO_DEEP, TRUNCATED, NO_ANSWER
    answer: str | None = None  # the boxed answer of an answer step
    correct: bool | None = None  # graded against the gold answer (data generation / evaluation)
    exec_ok: bool | None = None  # did the trajectory's program run cleanly up to this step
    observation: str | None = None  # executor output (code_end) or error message
    error_streak: int = 0  # consecutive steps whose code failed, ending here
    expanded: bool = False
    stop_reason: str = ""
    n_tokens: int = 0
    rollout: int | None = None  # MCTS: the rollout that first reached this terminal (0-based)

    @property
    def Q(self) -> float:
        return self.q / self.N if self.N else self.q

    @property
    def is_terminal(self) -> bool:
        return self.terminal is not None


@dataclass
class Tree:
    question: str
    prompt: str
    nodes: list[Node]

    @classmethod
    def new(cls, question: str, prompt: str) -> Tree:
        return cls(question=question, prompt=prompt, nodes=[Node(id=0, parent=None, depth=0, text="")])

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_child(self, parent: Node, text: str, **kw) -> Node:
        node = Node(id=len(self.nodes), parent=parent.id, depth=parent.depth + 1, text=text, **kw)
        self.nodes.append(node)
        parent.children.append(node.id)
        return node

    def path(self, node: Node) -> list[Node]:
        """Nodes from the first step down to `node` (the root excluded)."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = self.nodes[node.parent]
        return out[::-1]

    def steps(self, node: Node) -> list[str]:
        return [n.text for n in self.path(node)]

    def prefix(self, node: Node) -> str:
        """The text the policy continues from: prompt + every step up to `node`."""
        return self.prompt + "".join(self.steps(node))

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[i] for i in node.children]

    def terminals(self) -> list[Node]:
        return [n for n in self.nodes if n.is_terminal]

    def answers(self) -> list[Node]:
        return [n for n in self.nodes if n.terminal == ANSWER]

    def to_dict(self) -> dict:
        return {"question": self.question, "prompt": self.prompt, "nodes": [asdict(n) for n in self.nodes]}

    @classmethod
    def from_dict(cls, d: dict) -> Tree:
        return cls(question=d["question"], prompt=d["prompt"], nodes=[Node(**n) for n in d["nodes"]])


def uct(child: Node, parent: Node, c: float, unvisited: str) -> float:
    """UCT(s) = Q(s) + c * sqrt(ln N_parent / N(s)) (paper eq. 1).

    A child with no visit yet is ranked by its reward-model value where it has one (inference
    and PPM-augmented rounds: the PPM steers which child is tried first, as the authors' initial
    values do), else scores +inf (`unvisited='inf'`: each child is tried once before any is
    revisited, the textbook rule for rounds 1-2) or 0 (`'zero'`: the authors' code, q = 0 and
    no exploration bonus before a visit, so the search goes deep first). With one visit or more
    the exploration term is 0 while the parent has at most one (ln 1 = 0, as in the authors').
    """
    if child.N == 0:
        if child.value is not None:
            return child.value
        return math.inf if unvisited == "inf" else 0.0
    return child.Q + c * math.sqrt(math.log(max(parent.N, 1)) / child.N)


def is_open(tree: Tree, node: Node) -> bool:
    """Whether a rollout can still reach something new below `node`: it is not terminal, and
    it is unexpanded or has an open child. Terminals are never selected (an answer is backed up
    once, when it is created; an invalid step is pruned), and a node whose children are all
    closed is closed too (the authors mark it terminal)."""
    if node.is_terminal:
        return False
    if not node.expanded:
        return True
    return any(is_open(tree, child) for child in tree.children(node))


def select_child(tree: Tree, node: Node, c: float, unvisited: str, rng: random.Random) -> Node | None:
    """The open child with the highest UCT, ties broken at random (so that 'inf' does not
    always take the first sibling); None when no child is open."""
    scores = [
        (uct(child, node, c, unvisited), child) for child in tree.children(node) if is_open(tree, child)
    ]
    if not scores:
        return None
    top = max(s for s, _ in scores)
    return rng.choice([child for s, child in scores if s == top])


def backup(tree: Tree, leaf: Node, value: float) -> None:
    """Add `value` to q and 1 to N of the leaf and of every ancestor, root included
    (paper: q(s_i)^k = q(s_i)^(k-1) + q(s_d)^k)."""
    node: Node | None = leaf
    while node is not None:
        node.N += 1
        node.q += value
        node = tree.nodes[node.parent] if node.parent is not None else None
