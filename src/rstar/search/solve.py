"""`rstar solve "QUESTION"`: one search at inference, the chosen trajectory printed step by step."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from rstar import RstarError
from rstar.checks import check_models
from rstar.config import Config, add_config_arguments
from rstar.search.expand import best_answer_node, derive_seed
from rstar.search.jobs import check_reward, open_backends
from rstar.search.run import add_model_arguments, config_with_model_args
from rstar.search.scheduler import Backends, Job, run_jobs
from rstar.search.tree import Tree


@dataclass
class Question:
    """A problem without an id from a file (what `solve` searches)."""

    question: str
    answer: str = ""
    id: str = "question"
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer}


def check_gold(cfg: Config, gold: str) -> None:
    """Terminal-guided MCTS (data generation) values a terminal by its graded answer: without a
    gold answer every terminal would back up -1 and the answer would be picked blind."""
    if cfg.search.mode == "mcts" and cfg.search.terminal_guided and not gold:
        raise RstarError(
            "this search is terminal-guided (search.terminal_guided=true: a data-generation preset) and "
            "needs the gold answer: pass --answer ANSWER, or use an inference preset such as --preset eval"
        )


def solve(question: str, cfg: Config, backends: Backends, gold: str = "") -> Tree:
    check_gold(cfg, gold)
    check_reward(cfg, backends.reward)
    trees: list[Tree] = []
    job = Job(problem=Question(question, gold), seed=derive_seed(cfg.search.seed, "solve", question))

    def on_error(_job: Job, tb: str) -> None:
        raise RuntimeError(f"search failed:\n{tb}")

    run_jobs([job], cfg, backends, lambda _j, tree, _i: trees.append(tree), on_error)
    return trees[0]


def format_trajectory(tree: Tree, by_value: bool | None = None) -> str:
    best = best_answer_node(tree, by_value)
    if best is None:
        return f"no answer found ({len(tree.nodes) - 1} nodes searched)\n"
    lines = []
    for i, node in enumerate(tree.path(best), 1):
        value = f" value={node.value:+.3f}" if node.value is not None else ""
        lines.append(f"--- step {i} [{node.kind}] Q={node.Q:+.3f} N={node.N}{value}")
        lines.append(node.text.strip("\n"))
        if node.observation is not None and node.kind != "code_end":
            lines.append(f"[output] {node.observation}")
    verdict = "" if best.correct is None else f" ({'correct' if best.correct else 'wrong'})"
    lines.append(f"=== answer: {best.answer}{verdict}   ({len(tree.nodes) - 1} nodes searched)")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", help="the math question")
    parser.add_argument(
        "--mode", choices=["mcts", "beam", "bon", "greedy"], help="search mode (sets search.mode)"
    )
    parser.add_argument("--answer", default="", help="gold answer, to mark the result correct or wrong")
    parser.add_argument("--json", action="store_true", help="print the whole tree as JSON")
    add_model_arguments(parser)
    add_config_arguments(parser, default_preset="eval")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    if args.mode:
        args.overrides = [f"search.mode={args.mode}", *args.overrides]
    cfg = config_with_model_args(args)
    check_gold(cfg, args.answer)
    check_models(cfg.model)
    with open_backends(cfg, need_grader=bool(args.answer)) as backends:
        tree = solve(args.question, cfg, backends, gold=args.answer)
    print(
        json.dumps(tree.to_dict()) if args.json else format_trajectory(tree),
        end="" if not args.json else "\n",
    )
    return 0
