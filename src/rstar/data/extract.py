"""`rstar extract`: training data from tree files (paper section 3.3; RSTAR_MATH.md section 3).

    rstar extract sft TREES... --out sft.jsonl       policy SFT data   {"query", "response"}
    rstar extract ppm TREES... --out pairs.jsonl     PPM pairs         {"prompt", "neg", "pos", "neg_count", "pos_count"}
    rstar extract orm TREES... --out orm.jsonl       ORM baseline pairs (same format; outcome only, no Q)
    rstar extract pqm TREES... --out pqm.jsonl       PQM baseline      {"prompt", "step", "q"}
    rstar extract coverage TREES...                  share of problems with a correct trajectory

TREES are tree files (docs/TREE_FILES.md) or directories holding a `trees.jsonl`. An output
path ending in `.json` gets a JSON array (like the authors' released files), anything else
JSONL, `-` JSONL on stdout. The formats are the authors' byte for byte
(examples in tests/fixtures/rstar_format/), so their released data and ours are interchangeable.

Definitions (the paper leaves these to the code; the choices are ours where noted):

- A *trajectory* is a root-to-terminal path ending at an `answer` terminal; its response is
  the concatenation of its step texts (it starts with `<code>`) and it is correct iff the
  answer node's `correct` is true. Its mean Q and min Q are over its steps (root excluded),
  with `Q = q / N` (or `q` when `N == 0`).
- *Error-free*: no step on the path failed (`exec_ok` false, `error_streak` > 0, a failure
  `observation` on a non-`code_end` step, a `code_error` terminal). The sandbox's `exec_ok`
  is the ground truth, so unlike the authors we never grep outputs for "error".
- Q is only meaningful where the search visited: every Q-based choice (SFT, PPM, PQM) uses
  visited nodes (`N > 0`) only; trees without visits (best-of-N, greedy) give no SFT/PPM/PQM
  data, but do count for coverage and ORM.
- Problems pool the trajectories of all their searches (same `problem.id`, several
  `search_index`, several files) for SFT and whole-trajectory pairs; step pairs stay per tree,
  because Q values are only comparable inside one tree. The same search read twice (same
  `key`, `seed` and models: the record's `config.model.policy` and `.ppm`) is counted once;
  two rounds' trees of a problem share key and seed but not the policy, so both count.
- Prompts are rebuilt from the question with `sft_prompt` / `ppm_prompt`, not copied from
  `tree.prompt`: round-1 trees are searched with a few-shot prompt, but the data trains a
  model that is prompted with `sft_prompt`.

PPM pairs (choice: the filters default to the authors' values, margin 0.5 and edit
distance 20; pass 0 to turn either off):

- *Step pairs*, per expanded node of each tree: among its visited children, those whose
  subtree holds a correct answer reached without errors *lead to a correct answer*; those
  whose subtree has terminals, none of them correct (invalid terminals count as wrong) and
  none ungraded, *lead to a wrong answer*. The `top_k` highest-Q of the first are positives,
  the `top_k` lowest-Q of the second negatives; every positive x negative is a record with
  `pos_count`/`neg_count` = the numbers selected at that node (before the pair filters: they
  describe the node, and `pos_count * neg_count` is how many pairs it had). Children that are
  answer terminals give no step pairs: the whole-trajectory pairs replace them.
- Split (the authors' convention): for a first step, `prompt = ppm_prompt(question)` and
  pos/neg = `"\\n" + ASSISTANT_HEADER + step`; deeper, `prompt = sft_prompt(question) + steps
  1..i-1` and pos/neg = the step. Either way `prompt + pos` is the full text of the prefix
  ending in that step, which is the string the PPM scores.
- *Whole-trajectory pairs* (the final-answer step), per problem: the `top_k` error-free
  correct trajectories (*finished*: the answer step ends with `<end_of_answer>`, as for SFT
  and the ORM) with the highest mean Q (ties: higher min Q) against the `top_k`
  incorrect ones with the lowest mean Q (ties: lower min Q), in the first-step format with
  the whole response. Incorrect = an answer graded wrong; `invalid_negatives=True` also
  admits trajectories ending at an invalid terminal (code error, truncated, ...), as one of
  the authors' example pairs does.
- A pair is dropped when its Q margin (pos Q - neg Q; mean Qs for whole pairs) is below
  `min_margin`, or else when the Levenshtein distance of pos and neg is below
  `min_edit_distance` characters; each pair counts under the first filter that drops it.

ORM pairs (Table 8 baseline): whole trajectories only, finished error-free correct vs incorrect,
chosen without Q: the `top_k` of each side with the smallest stable hash of
(seed, problem id, response), i.e. a seeded random choice that does not depend on file
order; edit-distance filter as above, no margin. PQM records (the other baseline): every
visited non-root node's Q as the regression target, split like the step pairs (answer steps
included, with the step split).

Why one file of this length: SFT, PPM, ORM and PQM extraction share one pass over the trees,
the structural checks of a record and the pair filters; one function per extraction kind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rstar import RstarError, steps
from rstar.config import AUTHORS_MIN_EDIT_DISTANCE, AUTHORS_MIN_MARGIN
from rstar.search.tree import ANSWER, CODE_ERROR, Node, Tree
from rstar.search.treefile import read_trees, tree_files
from rstar.steps import ASSISTANT_HEADER, ppm_prompt, sft_prompt

# Node fields without which a tree cannot be read; the others default (docs/TREE_FILES.md).
_REQUIRED_NODE_FIELDS = ("id", "parent", "depth", "text", "children", "N", "q")
_NODE_FIELDS = {f.name for f in fields(Node)}
# First-step texts follow the header in the authors' pair format (prompt = ppm_prompt).
_FIRST_STEP_HEAD = "\n" + ASSISTANT_HEADER


# --- reading -------------------------------------------------------------------------------

# What the extractors take: tree-file records (dicts), or (origin, record) pairs from
# `rstar.search.treefile.read_trees`, whose origin ("file:line") then names a bad record.
Records = Iterable[dict] | Iterable[tuple[str, dict]]


@dataclass
class SearchRecord:
    """One tree-file record, validated: the fields extraction uses."""

    origin: str  # "file:line" or "record i", for error messages
    key: str
    seed: Any
    problem_id: str
    question: str
    level: str | None
    index: int
    tree: Tree
    models: str = ""  # the policy and PPM that searched (record's config.model), "" if not recorded


def _field(d: Any, name: str, origin: str, where: str = "") -> Any:
    if not isinstance(d, dict) or name not in d:
        raise RstarError(f"{origin}: not a tree record: missing field '{where}{name}'")
    return d[name]


def parse_search(origin: str, rec: dict) -> SearchRecord:
    """Validate one record and build its Tree; RstarError naming `origin` if it is not one."""
    key = _field(rec, "key", origin)
    problem = _field(rec, "problem", origin)
    pid = _field(problem, "id", origin, "problem.")
    t = _field(rec, "tree", origin)
    question = _field(t, "question", origin, "tree.")
    raw_nodes = _field(t, "nodes", origin, "tree.")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise RstarError(f"{origin}: tree.nodes is not a non-empty list")
    nodes = []
    for i, nd in enumerate(raw_nodes):
        for name in _REQUIRED_NODE_FIELDS:
            _field(nd, name, origin, f"tree.nodes[{i}].")
        try:
            node = Node(**{k: v for k, v in nd.items() if k in _NODE_FIELDS})
            node.N, node.q = int(node.N), float(node.q)
        except (TypeError, ValueError) as e:
            raise RstarError(f"{origin}: tree.nodes[{i}]: bad node ({e})") from e
        if node.id != i:
            raise RstarError(f"{origin}: tree.nodes[{i}] has id {node.id} (ids are positions)")
        if not isinstance(node.text, str) or not isinstance(node.children, list):
            raise RstarError(f"{origin}: tree.nodes[{i}]: text must be a string, children a list")
        nodes.append(node)
    n = len(nodes)
    for node in nodes:
        for c in node.children:
            if not isinstance(c, int) or not 0 < c < n or nodes[c].parent != node.id:
                raise RstarError(f"{origin}: tree.nodes[{node.id}]: child {c!r} is not a node of it")
    index = rec.get("search_index", 0)
    if not isinstance(index, int):
        raise RstarError(f"{origin}: search_index must be an integer")
    config = rec.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return SearchRecord(
        origin=origin,
        key=str(key),
        seed=rec.get("seed"),
        problem_id=str(pid),
        question=str(question),
        level=problem.get("level"),
        index=index,
        tree=Tree(question=str(question), prompt=str(t.get("prompt", "")), nodes=nodes),
        models=json.dumps([model.get("policy"), model.get("ppm")]) if isinstance(model, dict) else "",
    )


def _sources(records: Records) -> Iterator[tuple[str, dict]]:
    """Records as (origin, record): the library API takes bare dicts, the CLI file origins."""
    for i, r in enumerate(records):
        if isinstance(r, tuple):
            yield r
        else:
            yield f"record {i}", r


# --- per-tree analysis -----------------------------------------------------------------------


def is_error(node: Node) -> bool:
    """Whether this step failed: its program did not run cleanly, or it ends an error run."""
    if node.exec_ok is False or node.error_streak > 0 or node.terminal == CODE_ERROR:
        return True
    # A code_end step's observation is its program's output; on any other step an
    # observation is only ever the error of a failed run.
    return node.observation is not None and node.kind != "code_end"


@dataclass
class ScoredPath:
    """A root-to-terminal path, reduced to what the selections need."""

    text: str  # the response: "".join of the step texts
    correct: bool | None  # None for ungraded answers and for invalid terminals
    terminal: str
    mean_q: float
    min_q: float
    error_free: bool
    visited: bool  # N > 0 at the terminal, hence along the whole path
    index: int  # search_index and node id: a stable tie-break
    node_id: int


def _order(tree: Tree) -> list[Node]:
    """Nodes reachable from the root, parents before children."""
    out, stack = [], [tree.root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(tree.nodes[c] for c in reversed(node.children))
    return out


@dataclass
class _Subtree:
    has_terminal: bool = False
    correct_clean: bool = False  # a correct answer reached without any error on its path
    correct_any: bool = False
    ungraded: bool = False  # an answer with correct = None


def _analyse(tree: Tree) -> tuple[list[Node], dict[int, bool], dict[int, _Subtree]]:
    """Preorder, `clean[id]` (no error from the root down to the node) and subtree summaries."""
    order = _order(tree)
    clean = {0: True}
    for node in order[1:]:
        clean[node.id] = clean[node.parent] and not is_error(node)
    sub: dict[int, _Subtree] = {}
    for node in reversed(order):
        s = _Subtree()
        if node.is_terminal:
            s.has_terminal = True
            if node.terminal == ANSWER:
                s.correct_any = node.correct is True
                s.correct_clean = s.correct_any and clean[node.id]
                s.ungraded = node.correct is None
        for c in node.children:
            cs = sub[c]
            s.has_terminal |= cs.has_terminal
            s.correct_clean |= cs.correct_clean
            s.correct_any |= cs.correct_any
            s.ungraded |= cs.ungraded
        sub[node.id] = s
    return order, clean, sub


def scored_paths(search: SearchRecord, invalid: bool = True) -> list[ScoredPath]:
    """Every root-to-terminal path of a tree: answer terminals, and invalid ones if `invalid`."""
    tree = search.tree
    out = []
    for node in tree.nodes:
        if not node.is_terminal or (node.terminal != ANSWER and not invalid):
            continue
        path = tree.path(node)
        if not path:
            continue
        qs = [n.Q for n in path]
        out.append(
            ScoredPath(
                text="".join(n.text for n in path),
                correct=node.correct if node.terminal == ANSWER else None,
                terminal=node.terminal or "",
                mean_q=sum(qs) / len(qs),
                min_q=min(qs),
                error_free=not any(is_error(n) for n in path),
                visited=node.N > 0,
                index=search.index,
                node_id=node.id,
            )
        )
    return out


def split_step(question: str, tree: Tree, node: Node) -> tuple[str, str]:
    """(prompt, step) for scoring `node` given its prefix, in the authors' pair format:
    `prompt + step == sft_prompt(question) + steps 1..i`."""
    if node.depth == 1:
        return ppm_prompt(question), _FIRST_STEP_HEAD + node.text
    return sft_prompt(question) + "".join(tree.steps(tree.nodes[node.parent])), node.text


def whole(question: str, response: str) -> tuple[str, str]:
    """(prompt, completion) of a whole trajectory in the authors' pair format."""
    return ppm_prompt(question), _FIRST_STEP_HEAD + response


# --- selection and filters -----------------------------------------------------------------


class _Best:
    """The k best trajectories by `rank` (smaller is better), distinct by text, kept bounded
    while trees stream in: a text keeps its best rank; pruning cannot lose a winner because a
    pruned text that comes back competes again with whatever rank it brings."""

    def __init__(self, k: int, rank: Callable[[ScoredPath], tuple]):
        self.k, self.rank = k, rank
        self.items: dict[str, tuple[tuple, ScoredPath]] = {}

    def add(self, t: ScoredPath) -> None:
        r = self.rank(t)
        old = self.items.get(t.text)
        if old is None or r < old[0]:
            self.items[t.text] = (r, t)
        if len(self.items) > 4 * max(self.k, 1):
            self._prune()

    def _prune(self) -> None:
        keep = sorted(self.items.values(), key=lambda x: x[0])[: self.k]
        self.items = {t.text: (r, t) for r, t in keep}

    def best(self) -> list[ScoredPath]:
        self._prune()
        return [t for _, t in sorted(self.items.values(), key=lambda x: x[0])]


def _high_q(t: ScoredPath) -> tuple:
    return (-t.mean_q, -t.min_q, t.index, t.node_id)


def _low_q(t: ScoredPath) -> tuple:
    return (t.mean_q, t.min_q, t.index, t.node_id)


@dataclass
class ExtractStats:
    """What an extraction read, kept and dropped: the CLI's summary."""

    files: int = 0
    trees: int = 0
    duplicates: int = 0  # the same search (key, seed and models) read again
    problems: int = 0
    covered: int = 0  # problems with at least one correct answer anywhere in their trees
    by_level: dict[str, list[int]] = field(default_factory=dict)  # level -> [problems, covered]
    records: int = 0
    step_pairs: int = 0
    whole_pairs: int = 0
    filtered_margin: int = 0
    filtered_edit_distance: int = 0
    correct_with_errors: int = 0  # visited correct trajectories dropped for a failed step
    unfinished_answers: int = 0  # correct answers whose step stopped before <end_of_answer>
    problems_with_data: int = 0


class _Filter:
    """The authors' pair filters, counting what each drops."""

    def __init__(self, min_margin: float, min_edit_distance: int, stats: ExtractStats):
        self.min_margin = min_margin
        self.min_edit_distance = min_edit_distance
        self.stats = stats
        self._distance: Callable[..., int] | None = None
        if min_edit_distance > 0:
            try:
                from rapidfuzz.distance import Levenshtein
            except ImportError as e:  # a dependency of rstar; only missing in a broken install
                raise RstarError(
                    "the edit-distance filter needs rapidfuzz (pip install rapidfuzz), "
                    "or pass --min-edit-distance 0"
                ) from e
            self._distance = Levenshtein.distance

    def keep(self, pos: str, neg: str, margin: float | None) -> bool:
        if margin is not None and self.min_margin > 0 and margin < self.min_margin:
            self.stats.filtered_margin += 1
            return False
        if self._distance is not None:
            # score_cutoff bounds the work: past the threshold the exact distance is irrelevant.
            d = self._distance(pos, neg, score_cutoff=self.min_edit_distance)
            if d < self.min_edit_distance:
                self.stats.filtered_edit_distance += 1
                return False
        return True


def pair(prompt: str, pos: str, neg: str, pos_count: int, neg_count: int) -> dict:
    """A pair record with the authors' keys, in the authors' order."""
    return {"prompt": prompt, "neg": neg, "pos": pos, "neg_count": neg_count, "pos_count": pos_count}


def _pairs(
    prompt: str,
    pos: list[tuple[str, float | None]],
    neg: list[tuple[str, float | None]],
    flt: _Filter,
) -> list[dict]:
    """Every pos x neg pair that passes the filters; items are (completion, Q or None)."""
    out = []
    for p, pq in pos:
        for n, nq in neg:
            margin = pq - nq if pq is not None and nq is not None else None
            if flt.keep(p, n, margin):
                out.append(pair(prompt, p, n, len(pos), len(neg)))
    return out


def step_pairs(search: SearchRecord, top_k: int, flt: _Filter) -> list[dict]:
    """Per-step PPM pairs of one tree (see the module docstring)."""
    tree = search.tree
    order, _, sub = _analyse(tree)
    out = []
    for node in order:
        kids = [c for c in tree.children(node) if c.N > 0 and c.terminal != ANSWER]
        good = [c for c in kids if sub[c.id].correct_clean]
        bad = [
            c for c in kids if sub[c.id].has_terminal and not sub[c.id].correct_any and not sub[c.id].ungraded
        ]
        if not good or not bad:
            continue
        good = sorted(good, key=lambda c: (-c.Q, -c.N, c.id))[:top_k]
        bad = sorted(bad, key=lambda c: (c.Q, -c.N, c.id))[:top_k]
        prompt = split_step(search.question, tree, good[0])[0]
        pos = [(split_step(search.question, tree, c)[1], c.Q) for c in good]
        neg = [(split_step(search.question, tree, c)[1], c.Q) for c in bad]
        out.extend(_pairs(prompt, pos, neg, flt))
    return out


def pqm_records(search: SearchRecord) -> list[dict]:
    """{"prompt", "step", "q"} for every visited non-root node (PQM regression targets)."""
    tree = search.tree
    out = []
    for node in _order(tree)[1:]:
        if node.N > 0:
            prompt, step = split_step(search.question, tree, node)
            out.append({"prompt": prompt, "step": step, "q": node.Q})
    return out


def _stable_hash(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()


# --- the driver ----------------------------------------------------------------------------


@dataclass
class _Problem:
    """Everything kept about one problem while its trees stream in."""

    pid: str
    question: str
    level: str | None
    covered: bool = False
    per_tree: list[tuple[tuple, list[dict]]] = field(default_factory=list)  # (order, records)
    pos: _Best | None = None
    neg: _Best | None = None


def _natural(s: str) -> list:
    """Sort key putting "p:2" before "p:10" (split alternates text and digit runs)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", s))]


def _level_name(level: Any) -> str:
    return "none" if level is None else str(level)


def solves(tree: Tree) -> bool:
    """Whether a search found the answer: some answer terminal of its tree is graded correct.
    A problem is *covered* when one of its searches solves it (the paper's Table 2 metric)."""
    return any(n.terminal == ANSWER and n.correct is True for n in tree.nodes)


def solved_ids(records: Iterable[dict]) -> set[str]:
    """Ids of the problems that some of these tree records solve (`solves`)."""
    return {str(rec["problem"]["id"]) for rec in records if solves(Tree.from_dict(rec["tree"]))}


def _check_arguments(top_k: int = 1, min_margin: float = 0.0, min_edit_distance: int = 0) -> None:
    if top_k < 1:
        raise RstarError(f"top_k must be at least 1 (got {top_k})")
    if min_margin < 0 or min_edit_distance < 0 or math.isnan(min_margin):
        raise RstarError("the filters' thresholds must be >= 0")


def _problems(
    records: Records, stats: ExtractStats, on_search: Callable[[_Problem, SearchRecord], None]
) -> list[_Problem]:
    """The one pass every extraction makes: validate each record, skip a search read twice (same
    key, seed and models), pool searches by problem (and note coverage), hand each new search to
    `on_search`. Returns the problems in natural order of their ids, counted into `stats`."""
    problems: dict[str, _Problem] = {}
    seen: set[tuple[str, str, str]] = set()
    for origin, rec in _sources(records):
        search = parse_search(origin, rec)
        ident = (search.key, json.dumps(search.seed), search.models)
        if ident in seen:
            stats.duplicates += 1
            continue
        seen.add(ident)
        stats.trees += 1
        prob = problems.get(search.problem_id)
        if prob is None:
            prob = problems[search.problem_id] = _Problem(search.problem_id, search.question, search.level)
        prob.covered |= solves(search.tree)
        on_search(prob, search)
    out = [problems[pid] for pid in sorted(problems, key=_natural)]
    for prob in out:
        stats.problems += 1
        stats.covered += prob.covered
        level = stats.by_level.setdefault(_level_name(prob.level), [0, 0])
        level[0] += 1
        level[1] += prob.covered
    return out


def _collect(
    prob: _Problem,
    search: SearchRecord,
    stats: ExtractStats,
    *,
    invalid: bool,
    visited_only: bool,
    negatives: bool,
) -> None:
    """Offer the search's trajectories to its problem's positives (error-free correct ones) and,
    with `negatives`, negatives (wrong answers; invalid terminals too with `invalid`)."""
    assert prob.pos is not None and (prob.neg is not None or not negatives)
    for t in scored_paths(search, invalid=invalid):
        if visited_only and not t.visited:
            continue
        if t.correct is True:
            if not t.error_free:
                if t.visited:
                    stats.correct_with_errors += 1
            elif not t.text.rstrip().endswith(steps.END_OF_ANSWER):
                # An answer step that ran on into code and stopped at another stop string
                # (`<answer>... \boxed{78}_shells = x - 8<end_of_step>`): the search grades
                # its box, but as a target it would teach the policy that broken format, and
                # the ORM's trainer refuses it as a whole solution. Neither side of a pair.
                stats.unfinished_answers += 1
            else:
                prob.pos.add(t)
        elif negatives and (t.correct is False or t.terminal != ANSWER):
            assert prob.neg is not None
            prob.neg.add(t)


def _whole_pairs(prob: _Problem, flt: _Filter, use_q: bool) -> list[dict]:
    """Whole-trajectory pairs of a problem: its best positives x its best negatives."""
    assert prob.pos is not None and prob.neg is not None
    good, bad = prob.pos.best(), prob.neg.best()
    if not good or not bad:
        return []
    pos = [(whole(prob.question, t.text)[1], t.mean_q if use_q else None) for t in good]
    neg = [(whole(prob.question, t.text)[1], t.mean_q if use_q else None) for t in bad]
    pairs = _pairs(ppm_prompt(prob.question), pos, neg, flt)
    flt.stats.whole_pairs += len(pairs)
    return pairs


def _per_tree(prob: _Problem) -> list[dict]:
    """The records kept per tree, searches by search_index."""
    return [r for _, recs in sorted(prob.per_tree, key=lambda x: x[0]) for r in recs]


def _emit(
    problems: list[_Problem], stats: ExtractStats, records_of: Callable[[_Problem], list[dict]]
) -> list[dict]:
    out: list[dict] = []
    for prob in problems:
        recs = records_of(prob)
        stats.records += len(recs)
        stats.problems_with_data += bool(recs)
        out.extend(recs)
    return out


def _order_of(search: SearchRecord) -> tuple:
    return (search.index, search.key, json.dumps(search.seed))


def _dedupe(recs: list[dict]) -> list[dict]:
    """Drop repeated (prompt, pos, neg): two searches of a problem can share a branch."""
    seen, out = set(), []
    for r in recs:
        k = (r["prompt"], r["pos"], r["neg"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


# --- library API ---------------------------------------------------------------------------


def extract_sft(records: Records, top_k: int = 2, stats: ExtractStats | None = None) -> list[dict]:
    """Policy SFT data, `{"query", "response"}`: per problem, the `top_k` finished error-free
    correct trajectories (distinct responses, pooled over the problem's searches) with the
    highest mean Q, ties by the higher min Q."""
    _check_arguments(top_k)
    stats = stats if stats is not None else ExtractStats()

    def on_search(prob: _Problem, search: SearchRecord) -> None:
        prob.pos = prob.pos or _Best(top_k, _high_q)
        _collect(prob, search, stats, invalid=False, visited_only=True, negatives=False)

    def records_of(prob: _Problem) -> list[dict]:
        return [{"query": prob.question, "response": t.text} for t in prob.pos.best()] if prob.pos else []

    return _emit(_problems(records, stats, on_search), stats, records_of)


def extract_ppm(
    records: Records,
    top_k: int = 2,
    min_margin: float = AUTHORS_MIN_MARGIN,
    min_edit_distance: int = AUTHORS_MIN_EDIT_DISTANCE,
    invalid_negatives: bool = False,
    stats: ExtractStats | None = None,
) -> list[dict]:
    """PPM preference pairs, `{"prompt", "neg", "pos", "neg_count", "pos_count"}`: step pairs
    per tree, then whole-trajectory pairs per problem (module docstring). The filters default
    to the authors' values (Q margin 0.5, edit distance 20); 0 turns a filter off."""
    _check_arguments(top_k, min_margin, min_edit_distance)
    stats = stats if stats is not None else ExtractStats()
    flt = _Filter(min_margin, min_edit_distance, stats)

    def on_search(prob: _Problem, search: SearchRecord) -> None:
        if prob.pos is None:
            prob.pos, prob.neg = _Best(top_k, _high_q), _Best(top_k, _low_q)
        prob.per_tree.append((_order_of(search), step_pairs(search, top_k, flt)))
        _collect(prob, search, stats, invalid=invalid_negatives, visited_only=True, negatives=True)

    def records_of(prob: _Problem) -> list[dict]:
        recs = _dedupe(_per_tree(prob))
        stats.step_pairs += len(recs)
        return recs + _whole_pairs(prob, flt, use_q=True)

    return _emit(_problems(records, stats, on_search), stats, records_of)


def extract_orm(
    records: Records,
    top_k: int = 2,
    min_edit_distance: int = AUTHORS_MIN_EDIT_DISTANCE,
    invalid_negatives: bool = False,
    seed: int = 0,
    stats: ExtractStats | None = None,
) -> list[dict]:
    """Outcome-only pairs for the ORM baseline (paper Table 8), in the PPM pair format: per
    problem, `top_k` error-free correct vs `top_k` incorrect whole trajectories picked by a
    seeded hash, not by Q (an ORM must not learn from process values)."""
    _check_arguments(top_k, 0.0, min_edit_distance)
    stats = stats if stats is not None else ExtractStats()
    flt = _Filter(0.0, min_edit_distance, stats)

    def on_search(prob: _Problem, search: SearchRecord) -> None:
        if prob.pos is None:
            pid = search.problem_id

            def rank(t: ScoredPath) -> tuple:
                return (_stable_hash(str(seed), pid, t.text),)

            prob.pos, prob.neg = _Best(top_k, rank), _Best(top_k, rank)
        # Only ORM chooses without Q, so unvisited trajectories (best-of-N trees) count too.
        _collect(prob, search, stats, invalid=invalid_negatives, visited_only=False, negatives=True)

    return _emit(
        _problems(records, stats, on_search), stats, lambda prob: _whole_pairs(prob, flt, use_q=False)
    )


def extract_pqm(records: Records, stats: ExtractStats | None = None) -> list[dict]:
    """Pointwise `{"prompt", "step", "q"}` records for the PQM baseline (Q regression): every
    visited non-root node, split like the PPM step pairs."""
    stats = stats if stats is not None else ExtractStats()

    def on_search(prob: _Problem, search: SearchRecord) -> None:
        prob.per_tree.append((_order_of(search), pqm_records(search)))

    return _emit(_problems(records, stats, on_search), stats, _per_tree)


def coverage(records: Records, stats: ExtractStats | None = None) -> dict:
    """Share of problems with at least one correct trajectory (`solves`: any correct answer
    terminal in any of its searches), overall and per `problem.level`: the paper's Table 2
    metric.

    Returns {"problems", "covered", "coverage", "by_level": {level: {"problems", "covered",
    "coverage"}}}; problems without a level are under "none"."""
    stats = stats if stats is not None else ExtractStats()
    _problems(records, stats, lambda prob, search: None)
    return _coverage_dict(stats)


def coverage_by_steps(problems: list, solved: set[str]) -> dict[str, dict]:
    """Coverage by the length of the problem's reference solution in code steps, for
    problems that ship one in the step format (`meta["solution"]`, as the embedded world's
    do; a GSM8K text solution has no code step and is left out): where in the chain length
    search stops finding solutions. `solved`: the ids of the covered problems (`solved_ids`).
    {} when no problem has one."""
    counts: dict[int, list[int]] = {}
    for p in problems:
        ref = p.meta.get("solution")
        n = (
            sum(steps.parse_step(s).kind == "code" for s in steps.split_steps(ref))
            if isinstance(ref, str)
            else 0
        )
        if not n:
            continue
        c = counts.setdefault(n, [0, 0])
        c[0] += 1
        c[1] += p.id in solved
    return {str(n): {"problems": k, "covered": c, "coverage": c / k} for n, (k, c) in sorted(counts.items())}


def _coverage_dict(stats: ExtractStats) -> dict:
    def share(n: int, k: int) -> float:
        return k / n if n else 0.0

    return {
        "problems": stats.problems,
        "covered": stats.covered,
        "coverage": share(stats.problems, stats.covered),
        "by_level": {
            lvl: {"problems": n, "covered": k, "coverage": share(n, k)}
            for lvl, (n, k) in sorted(stats.by_level.items(), key=lambda x: _natural(x[0]))
        },
    }


# --- output and CLI ------------------------------------------------------------------------


def write_records(records: list[dict], out: str | Path) -> None:
    """JSONL, or a JSON array (indent 4, like the authors' files) for a `.json` path; `-` is
    stdout. Files are written to a temporary name and renamed, so a killed run never leaves a
    half-written data file for training to pick up."""
    if str(out) == "-":
        for r in records:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(records, f, ensure_ascii=False, indent=4)
                f.write("\n")
            else:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "0/0"


def summary(what: str, stats: ExtractStats, args: argparse.Namespace | None = None) -> list[str]:
    """The lines the CLI prints after an extraction."""
    lines = [
        f"read {stats.trees} tree(s) of {stats.problems} problem(s) from {stats.files} file(s)"
        + (f"; {stats.duplicates} repeated search(es) skipped" if stats.duplicates else ""),
        f"coverage: {_pct(stats.covered, stats.problems)} problems have a correct trajectory",
    ]
    if len(stats.by_level) > 1 or (stats.by_level and "none" not in stats.by_level):
        for lvl, (n, k) in sorted(stats.by_level.items(), key=lambda x: _natural(x[0])):
            lines.append(f"  {lvl}: {_pct(k, n)}")
    if what == "coverage":
        return lines
    out = getattr(args, "out", None)
    noun = {"sft": "SFT trajectories", "ppm": "PPM pairs", "orm": "ORM pairs", "pqm": "PQM records"}[what]
    lines.append(f"wrote {stats.records} {noun} for {stats.problems_with_data} problem(s) to {out}")
    if what == "ppm":
        lines.append(f"  step pairs {stats.step_pairs}, whole-trajectory pairs {stats.whole_pairs}")
    if what in ("sft", "ppm", "orm") and stats.correct_with_errors:
        lines.append(f"  correct trajectories left out for a failed step: {stats.correct_with_errors}")
    if what in ("sft", "ppm", "orm") and stats.unfinished_answers:
        lines.append(
            f"  correct trajectories left out for an answer step without {steps.END_OF_ANSWER}: "
            f"{stats.unfinished_answers}"
        )
    if what in ("ppm", "orm") and args is not None:
        margin = getattr(args, "min_margin", None)
        parts = []
        if margin is not None:
            parts.append(
                f"{stats.filtered_margin} with Q margin < {margin:g}" if margin else "margin filter off"
            )
        ed = args.min_edit_distance
        parts.append(
            f"{stats.filtered_edit_distance} with edit distance < {ed}" if ed else "edit-distance filter off"
        )
        lines.append("  pairs filtered: " + ", ".join(parts))
    return lines


def to_trl(pair: dict) -> dict:
    """A pair in TRL's explicit-prompt preference format: `prompt` + `chosen` (`rejected`) is
    exactly the text the PPM scores as the better (worse) continuation."""
    return {"prompt": pair["prompt"], "chosen": pair["pos"], "rejected": pair["neg"]}


# One function per extraction: (records, stats, args) -> the records to write.
_EXTRACTORS: dict[str, Callable[[Records, ExtractStats, argparse.Namespace], list[dict]]] = {
    "sft": lambda recs, stats, a: extract_sft(recs, a.top_k, stats=stats),
    "ppm": lambda recs, stats, a: extract_ppm(
        recs, a.top_k, a.min_margin, a.min_edit_distance, a.invalid_negatives, stats=stats
    ),
    "orm": lambda recs, stats, a: extract_orm(
        recs, a.top_k, a.min_edit_distance, a.invalid_negatives, a.seed, stats=stats
    ),
    "pqm": lambda recs, stats, a: extract_pqm(recs, stats=stats),
}


def _require_trees(stats: ExtractStats, files: list[Path]) -> None:
    """Nothing read is an error, not "0 trees" (an empty file, or one cut-off or garbage line)."""
    if not stats.trees:
        raise RstarError(
            f"{', '.join(map(str, files))}: no tree records in it (empty, or only a cut-off line)"
        )


def _cli(args: argparse.Namespace) -> int:
    files = tree_files(args.trees)
    stats = ExtractStats(files=len(files))
    log = sys.stderr if getattr(args, "out", None) == "-" or getattr(args, "json", False) else sys.stdout
    if args.what == "coverage":
        cov = coverage(read_trees(files), stats)
        _require_trees(stats, files)
        if args.json:
            print(json.dumps(cov, indent=2))
    else:
        out = _EXTRACTORS[args.what](read_trees(files), stats, args)
        _require_trees(stats, files)
        if getattr(args, "format", "authors") == "trl":
            out = [to_trl(r) for r in out]
        write_records(out, args.out)
    for line in summary(args.what, stats, args):
        print(line, file=log)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)

    def command(name: str, help_: str, out: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("trees", nargs="+", help="tree files, or run directories holding trees.jsonl")
        if out:
            p.add_argument(
                "--out", required=True, help="output file: .json = JSON array, else JSONL; - = stdout"
            )
        p.set_defaults(func=_cli)
        return p

    def top_k(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--top-k", type=int, default=2, help=f"{what} (default 2, the paper's)")

    def edit_distance(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--min-edit-distance",
            type=int,
            default=AUTHORS_MIN_EDIT_DISTANCE,
            help="drop pairs whose pos and neg are fewer than this many characters apart "
            f"(Levenshtein; default {AUTHORS_MIN_EDIT_DISTANCE}, the authors'; 0 = off)",
        )

    def invalid(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--invalid-negatives",
            action="store_true",
            help="whole-trajectory negatives may also end at an invalid terminal (code error, "
            "truncated, too deep, no boxed answer), not only at a wrong answer",
        )

    def pair_format(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--format",
            choices=["authors", "trl"],
            default="authors",
            help="authors: {prompt, pos, neg, pos_count, neg_count} (default; what `rstar train ppm` "
            "reads); trl: {prompt, chosen, rejected}, the preference format of TRL's RewardTrainer and "
            "DPOTrainer (prompt + chosen is the scored text)",
        )

    p = command("sft", "policy SFT data: per problem the top-k error-free correct trajectories by mean Q")
    top_k(p, "trajectories per problem")
    p = command("ppm", "PPM preference pairs: per-step pairs and final-step whole-trajectory pairs")
    top_k(p, "positives and negatives per step and per problem")
    p.add_argument(
        "--min-margin",
        type=float,
        default=AUTHORS_MIN_MARGIN,
        help=f"drop pairs whose Q margin is below this (default {AUTHORS_MIN_MARGIN}, the authors'; 0 = off)",
    )
    edit_distance(p)
    invalid(p)
    pair_format(p)
    p = command("orm", "ORM baseline pairs: correct vs incorrect whole trajectories, without Q")
    top_k(p, "positives and negatives per problem")
    edit_distance(p)
    invalid(p)
    pair_format(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the choice among trajectories")
    command("pqm", "PQM baseline records: every visited step's Q as a regression target")
    p = command("coverage", "share of problems with a correct trajectory, overall and per level", out=False)
    p.add_argument("--json", action="store_true", help="print the coverage as JSON")
