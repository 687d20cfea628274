"""The two interfaces every backend implements.

A *policy* continues many prompts at once, each with n samples, stopping at step tags;
a *reward model* scores many (prefix, step) texts at once. The search scheduler gathers the
pending work of every problem in flight into one call of each, so backends only ever see
batches: keep them free of per-problem state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class GenRequest:
    prompt: str  # full text so far: prompt + steps (the backend tokenizes it as is)
    n: int = 1  # samples wanted
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # per-request seed (exact in vLLM; see each backend for its guarantee)


@dataclass
class Completion:
    text: str  # generated text, ending with the stop string that ended it when stop_reason == "stop"
    stop_reason: str  # "stop" (a stop string), "length" (max_new_tokens), "eos"
    n_tokens: int = 0  # generated tokens, for throughput figures


@runtime_checkable
class Policy(Protocol):
    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        """For each request, `request.n` completions, in request order."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    def score(self, prefixes: list[str], steps: list[str]) -> list[float]:
        """Score each step given its prefix (prompt + earlier steps); values in [-1, 1]."""
        ...


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """End index of the first stop string in `text` (earliest start; the shorter on a tie),
    or None if there is none."""
    best: tuple[int, int] | None = None
    for s in stops:
        if not s:
            continue
        i = text.find(s)
        if i >= 0 and (best is None or (i, i + len(s)) < best):
            best = (i, i + len(s))
    return None if best is None else best[1]
