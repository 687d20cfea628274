"""The scheduler: many searches in flight, their work batched across problems.

Each search is a generator (see `expand.py`) that yields one request at a time. The loop:

1. admit new searches until `max_inflight` are active;
2. send each search whose request is answered its result, collecting its next request;
3. code runs in the sandbox pool and answers are graded in worker processes: both are
   submitted as futures and run *while* the model works;
4. every pending Generate request of every search becomes one `policy.generate` call, every
   pending Score request one `reward.score` call.

There is no barrier per rollout or per problem: a search waiting on a slow program only
waits for itself (the loop waits for outstanding futures at most `EXEC_WAIT_S` before it
calls the model without them).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rstar.config import Config
from rstar.models.base import Policy, RewardModel
from rstar.search import SEARCHES
from rstar.search.expand import (
    Execute,
    Generate,
    Grade,
    Score,
    SearchContext,
    best_answer_node,
    settles_by_value,
)
from rstar.search.tree import Tree

# How long the loop lets sandbox/grading futures finish before it calls the model without
# them. Programs take ~1 ms, so a short wait makes the next batch fuller; a program that runs
# to its time limit only delays its own search.
EXEC_WAIT_S = 0.02
# Whether that wait is skipped once at least as many searches are ready for the model as are
# still waiting on their programs: the model call then runs while the sandbox workers run the
# others' programs (on a 2-core machine the two overlap), and the searches settle into two
# cohorts that alternate, instead of every search waiting for the slowest program each step.
PIPELINE = True


@dataclass
class Job:
    """One search of one problem. `index` tells independent searches of a problem apart."""

    problem: Any  # rstar.data.problems.Problem (question, answer, id)
    index: int = 0
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.problem.id}#{self.index}"


@dataclass
class Backends:
    policy: Policy
    sandbox: Any  # rstar.sandbox.SandboxPool: submit(code) -> Future[ExecResult]
    reward: RewardModel | None = None
    grader: Any = None  # rstar.grading.Grader: grade_many(pairs) -> list[GradeResult]


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    solved: int = 0
    failed: int = 0
    nodes: int = 0
    tokens: int = 0
    model_calls: int = 0
    model_s: float = 0.0  # inside policy.generate and reward.score
    sequences: int = 0  # completions generated
    # Where the loop blocks outside the models: waiting for sandbox results (programs) and for
    # grading results, with no model call to make meanwhile or before making one (EXEC_WAIT_S).
    sandbox_wait_s: float = 0.0
    grading_wait_s: float = 0.0
    # Batch fullness: per model call, the searches whose request it carries, against the
    # searches in flight then (a search not in the call is waiting on its sandbox or grader).
    call_searches: int = 0
    call_inflight: int = 0

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    def as_dict(self) -> dict:
        wall = self.wall_s
        return {
            "done": self.done,
            "solved": self.solved,
            "failed": self.failed,
            "nodes": self.nodes,
            "tokens": self.tokens,
            "model_calls": self.model_calls,
            "model_s": round(self.model_s, 3),
            "wall_s": round(wall, 3),
            "nodes_per_s": round(self.nodes / wall, 2) if wall else 0.0,
            "tokens_per_s": round(self.tokens / wall, 1) if wall else 0.0,
            "sandbox_wait_s": round(self.sandbox_wait_s, 3),
            "grading_wait_s": round(self.grading_wait_s, 3),
            "batch_fullness": round(self.call_searches / self.call_inflight, 3)
            if self.call_inflight
            else 0.0,
        }

    def add_wait(self, seconds: float, active: list[_Active]) -> None:
        """Charge a blocking wait to the sandbox if any program is outstanding, else to grading."""
        if any(a.waiting and a.kind == "exec" for a in active):
            self.sandbox_wait_s += seconds
        else:
            self.grading_wait_s += seconds


@dataclass
class _Active:
    job: Job
    gen: Any
    started: float
    waiting: list[cf.Future] = field(default_factory=list)  # sandbox / grading futures
    kind: str = ""  # what `waiting` answers: "exec" or "grade"
    tokens: int = 0


def run_jobs(
    jobs: Iterable[Job],
    cfg: Config,
    backends: Backends,
    on_done: Callable[[Job, Tree, dict], None],
    on_error: Callable[[Job, str], None] | None = None,
    progress: Callable[[Stats], None] | None = None,
) -> Stats:
    """Run every job's search to the end; call `on_done(job, tree, info)` as each finishes
    (in completion order, not submission order)."""
    search_fn = SEARCHES[cfg.search.mode]
    stats = Stats()
    pending_jobs: Iterator[Job] = iter(jobs)
    active: list[_Active] = []
    to_generate: list[tuple[_Active, Generate]] = []
    to_score: list[tuple[_Active, Score]] = []
    ready: list[tuple[_Active, Any]] = []
    grade_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rstar-grade")
    exhausted = False

    def finish(act: _Active, tree: Tree | None, error: str | None = None) -> None:
        active.remove(act)
        if error is not None:
            stats.failed += 1
            if on_error:
                on_error(act.job, error)
            return
        best = best_answer_node(tree, settles_by_value(cfg.search))
        info = {
            "seconds": round(time.perf_counter() - act.started, 3),
            "nodes": len(tree.nodes) - 1,
            "tokens": act.tokens,
            "answer": best.answer if best else None,
            "correct": best.correct if best else False,
        }
        stats.done += 1
        stats.nodes += info["nodes"]
        stats.solved += bool(info["correct"])
        on_done(act.job, tree, info)
        if progress:
            progress(stats)

    def advance(act: _Active, value: Any) -> None:
        try:
            req = act.gen.send(value)
        except StopIteration as stop:
            finish(act, stop.value)
            return
        except Exception:  # a bug or bad input in one search must not end the whole run
            finish(act, None, traceback.format_exc())
            return
        if isinstance(req, Generate):
            to_generate.append((act, req))
        elif isinstance(req, Score):
            if backends.reward is None:
                finish(
                    act, None, "search asked for reward-model scores but no reward model (--ppm) was given"
                )
                return
            to_score.append((act, req))
        elif isinstance(req, Execute):
            act.kind, act.waiting = "exec", [backends.sandbox.submit(p) for p in req.programs]
        elif isinstance(req, Grade):
            if backends.grader is None:
                ready.append((act, [False] * len(req.preds)))
            else:
                pairs = [(req.gold, p) for p in req.preds]
                act.kind, act.waiting = "grade", [grade_pool.submit(backends.grader.grade_many, pairs)]
        else:
            finish(act, None, f"unknown request {type(req).__name__}")

    def collect_futures(timeout: float) -> None:
        waiting = [f for a in active for f in a.waiting]
        if waiting and timeout > 0 and not all(f.done() for f in waiting):
            t0 = time.perf_counter()
            cf.wait(waiting, timeout=timeout, return_when=cf.ALL_COMPLETED)
            stats.add_wait(time.perf_counter() - t0, active)
        for act in list(active):
            if act.waiting and all(f.done() for f in act.waiting):
                futures, act.waiting = act.waiting, []
                if act.kind == "exec":
                    ready.append((act, [f.result() for f in futures]))
                else:
                    ready.append((act, [r.equivalent for r in futures[0].result()]))

    try:
        while True:
            while not exhausted and len(active) < cfg.scheduler.max_inflight:
                job = next(pending_jobs, None)
                if job is None:
                    exhausted = True
                    break
                ctx = SearchContext(
                    cfg=cfg.search,
                    question=job.problem.question,
                    gold=job.problem.answer or None,
                    seed=job.seed,
                    has_reward=backends.reward is not None,
                )
                act = _Active(job=job, gen=search_fn(ctx), started=time.perf_counter())
                active.append(act)
                ready.append((act, None))
            if not active and exhausted:
                break
            while ready:
                batch, ready[:] = list(ready), []
                for act, value in batch:
                    advance(act, value)
            n_ready = len(to_generate) + len(to_score)
            n_busy = sum(1 for a in active if a.waiting)
            fill = n_ready > 0 and (not PIPELINE or n_busy > n_ready)
            collect_futures(EXEC_WAIT_S if fill else 0.0)
            if ready:
                continue
            if to_generate or to_score:
                stats.call_searches += len(to_generate) + len(to_score)
                stats.call_inflight += len(active) * (bool(to_generate) + bool(to_score))
                # Both kinds in one pass: a search waiting for scores must not wait behind every
                # generate call while other searches keep asking for steps (inference MCTS).
                if to_generate:
                    _generate(backends.policy, to_generate, ready, stats)
                if to_score:
                    _score(backends.reward, to_score, ready, stats)
            elif any(a.waiting for a in active):
                t0 = time.perf_counter()
                cf.wait([f for a in active for f in a.waiting], timeout=1.0, return_when=cf.FIRST_COMPLETED)
                stats.add_wait(time.perf_counter() - t0, active)
                collect_futures(0.0)
    finally:
        grade_pool.shutdown(wait=False, cancel_futures=True)
    return stats


def _generate(policy: Policy, pending: list, ready: list, stats: Stats) -> None:
    batch, pending[:] = list(pending), []
    requests = [r for _, g in batch for r in g.requests]
    t0 = time.perf_counter()
    outputs = policy.generate(requests)
    stats.model_s += time.perf_counter() - t0
    stats.model_calls += 1
    i = 0
    for act, g in batch:
        part = outputs[i : i + len(g.requests)]
        i += len(g.requests)
        tokens = sum(c.n_tokens for outs in part for c in outs)
        act.tokens += tokens
        stats.tokens += tokens
        stats.sequences += sum(len(outs) for outs in part)
        ready.append((act, part))


def _score(reward: RewardModel, pending: list, ready: list, stats: Stats) -> None:
    batch, pending[:] = list(pending), []
    prefixes = [p for _, s in batch for p in s.prefixes]
    steps = [p for _, s in batch for p in s.steps]
    t0 = time.perf_counter()
    values = reward.score(prefixes, steps)
    stats.model_s += time.perf_counter() - t0
    stats.model_calls += 1
    i = 0
    for act, s in batch:
        ready.append((act, values[i : i + len(s.steps)]))
        i += len(s.steps)
