"""Synthetic but realistic tree-file records for the viewer tests (and for trying the viewer:
`python tests/helpers/viewer_trees.py OUT.jsonl`).

A tree is grown by a real MCTS loop over `rstar.search.tree` (UCT selection, expansion,
backup): steps are in the code-augmented format, each node carries a hidden chance that its
subtree reaches the right answer, and rollouts back up +1 / -1 drawn from it (terminal-guided
annotation). Answer, wrong-answer, code-error, too-deep and truncated terminals all occur.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from rstar.search.expand import best_answer_node
from rstar.search.tree import ANSWER, CODE_ERROR, TOO_DEEP, TRUNCATED, Node, Tree, backup, select_child

PROMPT = "<|user|>:\n{q}\n<|assistant|>: Let's think step by step and solve the problem with code."
# A step whose text holds '</script>': the page must show it verbatim and stay intact.
NASTY = "# beware: '</script><script>window.__pwned = 1</script>' & <!-- --> \u2028 in text\n"


def _code_step(rng: random.Random, depth: int, first: bool) -> str:
    var, a, b = f"x{depth}", rng.randint(2, 40), rng.randint(2, 40)
    head = "<code>\n" if first else "\n\n"
    return f"{head}# Step {depth}: multiply {a} by {b} and keep it as {var}\n{var} = {a} * {b}\n<end_of_step>"


def grow(
    n_nodes: int,
    seed: int,
    gold: str = "42",
    branching: int = 4,
    max_depth: int = 10,
    ppm: bool = False,
    nasty: bool = False,
) -> Tree:
    """An MCTS tree of about `n_nodes` nodes (root included)."""
    rng = random.Random(seed)
    tree = Tree.new(
        f"What is the answer number {seed}?", PROMPT.format(q=f"What is the answer number {seed}?")
    )
    chance = {0: 0.5}

    def new_child(parent: Node) -> Node:
        p = min(0.97, max(0.03, chance[parent.id] + rng.gauss(0, 0.25)))
        depth = parent.depth + 1
        value = round(max(-1.0, min(1.0, 2 * p - 1 + rng.gauss(0, 0.2))), 4) if ppm else None
        kw: dict = {
            "value": value,
            "q": value or 0.0,
            "n_tokens": rng.randint(10, 120),
            "stop_reason": "stop",
        }
        if parent.kind == "code_end":  # the answer step after the printed result
            correct = rng.random() < p
            ans = gold if correct else str(rng.randint(0, 99))
            text = f"\n<answer>From the result, the answer is \\boxed{{{ans}}}<end_of_answer>"
            node = tree.add_child(
                parent, text, kind="answer", terminal=ANSWER, answer=ans, correct=ans == gold, **kw
            )
        elif rng.random() < 0.06:
            text = f"\n\n# Step {depth}: divide by the count\ny = total / count\n<end_of_step>"
            node = tree.add_child(
                parent,
                text,
                kind="code",
                exec_ok=False,
                error_streak=parent.error_streak + 1,
                observation="NameError: name 'total' is not defined",
                terminal=CODE_ERROR,
                **kw,
            )
        elif rng.random() < 0.02:
            text = f"\n\n# Step {depth}: keep expanding the product " + "and so on " * 30
            node = tree.add_child(
                parent,
                text,
                kind="partial",
                terminal=TRUNCATED,
                stop_reason="length",
                **{k: v for k, v in kw.items() if k != "stop_reason"},
            )
        elif depth >= 3 and rng.random() < 0.12 + 0.05 * depth:
            out = gold if rng.random() < p else str(rng.randint(0, 99))
            text = (
                f"\n\n# Now print the final answer\nprint({out})\n<end_of_code>\n<output>{out}<end_of_output>"
            )
            node = tree.add_child(parent, text, kind="code_end", exec_ok=True, observation=out, **kw)
        else:
            text = _code_step(rng, depth, parent.id == 0)
            if nasty and rng.random() < 0.2:
                text = text.replace("\n<end_of_step>", "\n" + NASTY + "<end_of_step>")
            node = tree.add_child(parent, text, kind="code", exec_ok=True, **kw)
            if depth >= max_depth:
                node.terminal = TOO_DEEP
        chance[node.id] = p
        return node

    def leaf_value(node: Node) -> float:
        if node.terminal == ANSWER:
            return 1.0 if node.correct else -1.0
        return -1.0

    # One rollout: select by UCT down to a node not yet expanded, then expand and descend
    # (first child) until a terminal, whose value is backed up: the authors' MCTS. Bounded:
    # once every branch ends in a terminal, rollouts add no node and the tree stays smaller.
    for _ in range(20 * n_nodes):
        if len(tree.nodes) >= n_nodes:
            break
        node = tree.root
        while node.expanded and node.children:
            node = select_child(tree, node, c=2.0, unvisited="inf", rng=rng)
        while node.terminal is None:
            node.expanded = True
            k = 1 if node.kind == "code_end" else rng.randint(max(1, branching - 2), branching + 2)
            for _ in range(k):
                new_child(node)
            node = tree.nodes[node.children[0]]
        backup(tree, node, leaf_value(node))
    return tree


def record(pid: str, tree: Tree, gold: str = "42", search_index: int = 0, seed: int = 0) -> dict:
    best = best_answer_node(tree)
    answer = best.answer if best is not None else None
    return {
        "key": f"{pid}#{search_index}",
        "problem": {
            "id": pid,
            "question": tree.question,
            "answer": gold,
            "level": 3,
            "source": "synthetic",
            "meta": {},
        },
        "search_index": search_index,
        "seed": seed,
        "mode": "mcts",
        "answer": answer,
        "correct": None if answer is None else answer == gold,
        "stats": {
            "seconds": 1.5,
            "nodes": len(tree.nodes) - 1,
            "tokens": sum(n.n_tokens for n in tree.nodes),
        },
        "tree": tree.to_dict(),
        "config": {},
        "versions": {},
    }


def records(big: int = 4000) -> list[dict]:
    """One big search (about `big` nodes, with PPM values), then small ones."""
    out = [record("big", grow(big, seed=1, branching=8, max_depth=12, ppm=True, nasty=True), seed=1)]
    for i, (n, s) in enumerate([(40, 2), (25, 3), (60, 4)]):
        out.append(record(f"small-{i}", grow(n, seed=s, branching=3, max_depth=6), seed=s))
    return out


def write(path: str | Path, recs: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


if __name__ == "__main__":
    write(sys.argv[1], records(int(sys.argv[2]) if len(sys.argv) > 2 else 4000))
