"""What every search algorithm shares: the requests a search makes, and expansion.

A search is a Python generator. It yields a request (generate, execute, score, grade) and
receives its result; it returns its finished `Tree`. It never calls a model itself: the
scheduler (`scheduler.py`) gathers the pending requests of every search in flight into one
batched backend call per kind, so searches read as sequential code while the model sees
big batches and no problem waits for another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from rstar.config import SearchConfig
from rstar.models.base import GenRequest
from rstar.search.tree import ANSWER, CODE_ERROR, NO_ANSWER, TOO_DEEP, TRUNCATED, Node, Tree
from rstar.steps import (
    ROUND1_STOP_STRINGS,
    STOP_STRINGS,
    build_prompt,
    extract_boxed,
    parse_step,
    program,
    wrap_output,
)

# --- requests ------------------------------------------------------------------------------


@dataclass
class Generate:
    requests: list[GenRequest]  # -> list[list[Completion]]


@dataclass
class Execute:
    programs: list[str]  # -> list[ExecResult]


@dataclass
class Score:
    prefixes: list[str]  # -> list[float], one per (prefix, step)
    steps: list[str]


@dataclass
class Grade:
    gold: str
    preds: list[str]  # -> list[bool]


Request = Generate | Execute | Score | Grade
Search = Generator[Request, Any, Tree]


# --- context -------------------------------------------------------------------------------


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class SearchContext:
    """One search of one problem: its settings, gold answer (None at inference) and seed."""

    cfg: SearchConfig
    question: str
    gold: str | None = None
    seed: int = 0
    has_reward: bool = False  # a reward model is available for Score requests
    _calls: int = field(default=0, repr=False)

    @property
    def stop(self) -> list[str]:
        return ROUND1_STOP_STRINGS if self.cfg.stop_at_output else STOP_STRINGS

    def new_tree(self) -> Tree:
        return Tree.new(self.question, build_prompt(self.question, self.cfg.prompt_style))

    def request(self, prompt: str, n: int, temperature: float | None = None) -> GenRequest:
        # Each request of a search gets its own seed, derived from the search seed, so that a
        # search is reproducible and different searches of a problem differ.
        self._calls += 1
        return GenRequest(
            prompt=prompt,
            n=n,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p,
            stop=self.stop,
            seed=derive_seed(self.seed, self._calls),
        )


# --- expansion -----------------------------------------------------------------------------


def samples_for(node: Node, cfg: SearchConfig) -> int:
    """Children to sample under `node`: an ended program is followed by its answer, where the
    authors keep one child."""
    return cfg.answer_samples if node.kind == "code_end" else cfg.num_samples


def expand(
    tree: Tree,
    ctx: SearchContext,
    nodes: list[Node],
    n: list[int] | int,
    temperature: float | None = None,
    score: bool = False,
    merge: bool = True,
) -> Generator[Request, Any, list[Node]]:
    """Expand several nodes of one tree at once; return the new children.

    For each node: sample n next steps (one Generate request for all nodes), merge identical
    siblings, run the code of each new step's trajectory (one Execute request), mark
    terminals, grade answers when the gold answer is known, and score the new children with
    the reward model when `score` (PPM-augmented q, inference values, beam ranking).
    `merge=False` keeps identical samples as separate children (best-of-N counts solutions).
    """
    ns = [n] * len(nodes) if isinstance(n, int) else n
    completions = yield Generate(
        [ctx.request(tree.prefix(node), k, temperature) for node, k in zip(nodes, ns)]
    )
    new: list[Node] = []
    for node, outs in zip(nodes, completions):
        node.expanded = True
        seen: set[str] = set()
        for c in outs:
            if merge and c.text in seen:  # identical siblings are one node
                continue
            seen.add(c.text)
            step = parse_step(c.text)
            new.append(
                tree.add_child(node, c.text, kind=step.kind, stop_reason=c.stop_reason, n_tokens=c.n_tokens)
            )

    # Run the program of each trajectory that gained code. Every step's code is checked, so
    # a hallucinated step fails here; once `error_threshold` steps in a row have failed, the
    # node is a CODE_ERROR terminal, which MCTS never selects and beam search drops (paper
    # section 3.1). It stays in the tree as a negative for the PPM's pairs.
    coded = [ch for ch in new if ch.kind in ("code", "code_end")]
    if coded:
        results = yield Execute([program(tree.steps(ch)) for ch in coded])
        for ch, res in zip(coded, results):
            parent = tree.nodes[ch.parent]
            ch.exec_ok = res.ok
            ch.error_streak = 0 if res.ok else parent.error_streak + 1
            if ch.kind == "code_end":
                ch.observation = res.observation()
                ch.text += wrap_output(ch.observation)
            elif not res.ok:
                ch.observation = res.observation()

    for ch in new:
        if ch.kind == "answer":
            ch.answer = extract_boxed(ch.text)
            ch.terminal = ANSWER if ch.answer is not None else NO_ANSWER
        elif ch.kind == "partial":
            ch.terminal = TRUNCATED
        elif ch.error_streak >= ctx.cfg.error_threshold:
            ch.terminal = CODE_ERROR
        elif ch.depth > ctx.cfg.max_depth:  # as the authors: a step past max_depth
            ch.terminal = TOO_DEEP

    answered = [ch for ch in new if ch.terminal == ANSWER]
    if answered and ctx.gold is not None:
        verdicts = yield Grade(ctx.gold, [ch.answer for ch in answered])
        for ch, ok in zip(answered, verdicts):
            ch.correct = bool(ok)

    if score and new:
        if not ctx.has_reward:
            raise RuntimeError("this search needs a reward model (--ppm) to score steps")
        values = yield Score([tree.prefix(tree.nodes[ch.parent]) for ch in new], [ch.text for ch in new])
        for ch, v in zip(new, values):
            ch.value = float(v)
    return new


def terminal_value(node: Node, cfg: SearchConfig) -> float:
    """The value a terminal backs up: +1/-1 from the graded answer when terminal-guided
    (data generation), else the reward model's score of the answer (inference). Invalid
    terminals (code errors, too deep, truncated, no boxed answer) are worth -1."""
    if node.terminal != ANSWER:
        return -1.0
    if cfg.terminal_guided:
        return 1.0 if node.correct else -1.0
    if node.value is None:
        raise RuntimeError("inference search needs reward-model values on answer nodes")
    return node.value


def needs_reward(cfg: SearchConfig) -> bool:
    """Whether a search with these settings asks the reward model for scores."""
    if cfg.mode == "beam":
        return True
    if cfg.mode == "mcts":
        return cfg.ppm_init or not cfg.terminal_guided
    return False


def settles_by_value(cfg: SearchConfig) -> bool:
    """Whether a search picks its answer by reward value (inference: best-of-N, beam search,
    MCTS without ground truth) rather than by Q (data generation: terminal-guided MCTS,
    whose Q values come from the graded answers even when q was PPM-initialised)."""
    return not (cfg.mode == "mcts" and cfg.terminal_guided)


def best_answer_node(tree: Tree, by_value: bool | None = None) -> Node | None:
    """The answer a search settles on: the answer terminal with the highest reward value
    (`by_value`) or the highest Q, ties broken by visits. `by_value=None` decides from the
    tree (values on every answer: by value), for readers that have only the tree."""
    answers = tree.answers()
    if not answers:
        return None
    has_values = all(n.value is not None for n in answers)
    use_value = has_values if by_value is None else by_value and has_values
    key = (lambda n: (n.value, n.N)) if use_value else (lambda n: (n.Q, n.N))
    return max(answers, key=key)
