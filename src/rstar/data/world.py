"""A synthetic math world: word problems with exact gold answers at graded difficulty.

The embedded demo runs the paper's self-evolution (sections 2-5 of RSTAR_MATH.md) with a
tiny policy on a bare CPU. Real benchmarks are out of reach for such a model, so it needs a
world of its own in which the paper's effects can still show: round-by-round coverage gains
at the hardest level, MCTS + PPM above best-of-N, greedy below both. This module makes that
world. A tiny model cannot do arithmetic in its head, but it can learn to write one line of
code per sentence and copy the executed output into `\\boxed{}`: that is exactly what the
code-augmented step format (rstar.steps) is for, so every problem ships a reference solution
in that format.

Problems are short stories about one kind of object ("marbles") owned by named people::

    Mia has 14 marbles. She buys 3 bags with 6 marbles in each. Leo is 9 years old.
    She gives 9 marbles to Leo. Sam has twice as many marbles as Mia.
    How many marbles does Sam have now?

Design choices (and why):

- **Operations.** One sentence is one operation and one solution step (one line of code,
  a meaningful variable name `{person}_{objects}`, reassigned in place so that the program
  stays a straight line a small model can copy). Kinds: `add`, `sub`, `add_groups`
  ("3 bags with 6 in each"), `sub_groups`, `mul` ("doubles", "three times as many"),
  `div` (exact only: "keeps half", "splits equally into 4 boxes and keeps one"), the
  comparisons `cmp_add`/`cmp_sub`/`cmp_mul`/`cmp_div` ("Leo has 5 more / twice as many /
  half as many ... as Mia", including the inverted "Mia has 3 times as many as Leo") that
  move the story to a new person, and `together` (the question asks for the sum of the last
  two people). Each kind has four or more phrasings (`TEMPLATES`), and factors and divisors are
  sometimes words ("twice", "a third"), so that the policy has to read rather than pattern-
  match the position of digits.
- **Levels** (`LevelSpec`, default `DEFAULT_LEVELS`): 1: 1-2 single-person operations;
  2: 2-3 operations of every kind and one distractor sentence; 3: 3-4 operations and one
  distractor; 4: 4-5 operations, two distractors, and at least one multiplicative and one
  exact-division step. Every operation kind and the distractors already occur at levels
  1-2, so a policy pre-trained on easy levels knows every phrasing; what makes levels 3-4
  hard is the length of the chain, the changes of subject and the second distractor, which
  greedy decoding of a small policy gets wrong but a search can still find, and
  self-evolution can then learn from. That is the gap the demo needs. (Which levels seed
  the policy is the caller's choice, see `seed_sft_records`.) The levels are this close
  because a 2-layer policy copies sentences by position as much as by content and fails on
  questions much longer than any it was trained on; what that measured, and what holds level
  4 back (the length of the chain), is in docs/EXPERIMENTS.md ("World design").
- **Step numbers.** Solution comments are numbered (`# Step k:`): a 2-layer policy leans on
  them as anchors (docs/EXPERIMENTS.md).
- **Distractors**: sentences with numbers that do not matter (ages, prices, distances,
  other people's objects). Their numbers never equal a number the solution uses, so "the
  solution does not use them" is checkable (`meta["distractors"]`).
- **No shortcuts**: a story is drawn again when a program that skips some of its operations
  prints the gold answer too (`shortcut_answers`). The search grades a trajectory by its
  answer alone; with small integers, skipping sentences (the tiny policy's failure) would
  otherwise "solve" many long problems by coincidence and teach the policy to skip.
- **Sizes**: integers only; every intermediate value stays in [2, `max_value`] (999 by
  default: at most three digits, a handful of tokens with a digit-level tokenizer), and
  division is generated only where it is exact, so the gold answer is exactly what Python
  prints.
- **Pronouns**: a sentence says "she"/"he" only when the previous sentence had the same
  person as subject, and uses the name otherwise, so questions stay unambiguous.
- **Splits**: a question belongs to "train" or "test" by a hash of its text
  (`test_fraction` of hash space goes to test), independent of the seed, so the splits are
  disjoint by construction, even across seeds; `make_split` draws until each level has its
  count and drops duplicates. Per-level random streams make `make_split(n=100)` a prefix of
  `make_split(n=200)`.
- **Vocabulary** is deliberately small (a dozen names, objects and containers) so that a
  512-1000-token tokenizer covers it with whole words (`tokenizer_corpus`).

The reference solution (`meta["solution"]`) is a response in the authors' SFT format,
composed from the tags in rstar.steps: `steps.split_steps` partitions it into one step per
sentence, then the print step with its `<output>`, then the answer step; the program of its
steps prints the gold answer.

Why one file of this length: most of it is data (the vocabulary and the phrasings of every
operation kind, `TEMPLATES`), kept beside the generator that fills them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import random
import re
import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar import RstarError, steps
from rstar.data.problems import Problem

if TYPE_CHECKING:
    from rstar.config import EvolveConfig

# --- vocabulary --------------------------------------------------------------------------

# (name, gender) with gender "f" or "m": pronouns come from it.
NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "f"),
    ("Ava", "f"),
    ("Zoe", "f"),
    ("Lily", "f"),
    ("Emma", "f"),
    ("Nora", "f"),
    ("Leo", "m"),
    ("Sam", "m"),
    ("Dan", "m"),
    ("Ben", "m"),
    ("Tom", "m"),
    ("Jack", "m"),
)
# (singular, plural); plurals are single identifiers so they can be part of a variable name.
ITEMS: tuple[tuple[str, str], ...] = (
    ("marble", "marbles"),
    ("sticker", "stickers"),
    ("apple", "apples"),
    ("book", "books"),
    ("coin", "coins"),
    ("card", "cards"),
    ("shell", "shells"),
    ("pencil", "pencils"),
    ("cookie", "cookies"),
    ("stamp", "stamps"),
)
CONTAINERS: tuple[tuple[str, str], ...] = (
    ("bag", "bags"),
    ("box", "boxes"),
    ("pack", "packs"),
    ("jar", "jars"),
    ("basket", "baskets"),
)
PLACES: tuple[str, ...] = ("shop", "park", "school", "library")

_PRONOUNS = {
    "f": {"nom": "she", "obj": "her", "pos": "her"},
    "m": {"nom": "he", "obj": "him", "pos": "his"},
}
# Number words for factors and fractions; a template that uses one is only chosen when the
# number has a word here.
K_VERB = {2: "doubles", 3: "triples", 4: "quadruples"}
K_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times"}
K_FRAC = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth"}

# --- templates ---------------------------------------------------------------------------
#
# Slots: {S} the current person at the start of a sentence (name, or "She"/"He" when the
# previous sentence was about them); {s_name} their name; {s_nom}/{s_obj}/{s_pos} pronouns
# (s_obj falls back to the name where a pronoun could be ambiguous); {O} another person who
# is never counted; {W} the new person a comparison moves the story to; {a} an amount;
# {g} groups and {e} items in each; {k} a factor or divisor with {k_verb}/{k_times}/{k_frac}
# its words; {items}/{item}, {containers}/{container}; {n}, {other_items}, {place} for
# distractors. The first slot of a template names the grammatical subject (pronoun logic).

TEMPLATES: dict[str, tuple[str, ...]] = {
    "intro": (
        "{S} has {n} {items}.",
        "{S} starts with {n} {items}.",
        "{S} owns {n} {items}.",
        "{S} keeps {n} {items} in a {container}.",
        "{S} collects {n} {items}.",
    ),
    "add": (
        "{S} buys {a} more {items}.",
        "{S} finds {a} {items}.",
        "{O} gives {s_obj} {a} {items}.",
        "{S} gets {a} more {items} from {O}.",
        "{S} wins {a} {items} in a game.",
        "{S} picks up {a} more {items}.",
    ),
    "sub": (
        "{S} gives {a} {items} to {O}.",
        "{S} loses {a} {items}.",
        "{S} sells {a} of {s_pos} {items}.",
        "{O} takes {a} {items} from {s_obj}.",
        "{S} uses {a} {items}.",
        "{S} gives away {a} {items}.",
    ),
    "add_groups": (
        "{S} buys {g} {containers} with {e} {items} in each.",
        "{S} gets {g} {containers} of {e} {items} each.",
        "{O} gives {s_obj} {g} {containers}, each with {e} {items}.",
        "{S} finds {g} {containers} that hold {e} {items} each.",
        "{S} adds {g} {containers} of {e} {items}.",
    ),
    "sub_groups": (
        "{S} gives {e} {items} to each of {g} friends.",
        "{S} sells {g} {containers} with {e} {items} in each.",
        "{S} gives away {g} {containers} of {e} {items} each.",
        "{S} uses {e} {items} on each of {g} days.",
    ),
    "mul": (
        "{S} {k_verb} {s_pos} {items}.",
        "{S} now has {k_times} as many {items} as before.",
        "{S} ends up with {k} times as many {items} as {s_nom} had.",
        "{S} multiplies {s_pos} {items} by {k}.",
    ),
    "div": (
        "{S} keeps {k_frac} of {s_pos} {items} and gives the rest away.",
        "{S} splits {s_pos} {items} equally into {k} {containers} and keeps one {container}.",
        "{S} divides {s_pos} {items} into {k} equal groups and keeps one group.",
        "{S} loses all but {k_frac} of {s_pos} {items}.",
    ),
    "cmp_add": (
        "{W} has {a} more {items} than {s_name}.",
        "{W} has {a} {items} more than {s_name}.",
        "{W} owns {a} more {items} than {s_name} does.",
        "{W} has as many {items} as {s_name}, plus {a} more.",
    ),
    "cmp_sub": (
        "{W} has {a} fewer {items} than {s_name}.",
        "{W} has {a} {items} less than {s_name}.",
        "{W} owns {a} fewer {items} than {s_name} does.",
        "{W} has as many {items} as {s_name}, minus {a}.",
    ),
    "cmp_mul": (
        "{W} has {k_times} as many {items} as {s_name}.",
        "{W} has {k} times as many {items} as {s_name}.",
        "{W} owns {k} times the {items} that {s_name} has.",
        "{W} has {k_times} the number of {items} that {s_name} has.",
    ),
    "cmp_div": (
        "{W} has {k_frac} as many {items} as {s_name}.",
        "{s_name} has {k} times as many {items} as {W}.",
        "{s_name} has {k_times} as many {items} as {W}.",
        "{W} owns {k_frac} as many {items} as {s_name} does.",
    ),
    # The sum of the last two people; its sentence is the question itself.
    "together": (
        "How many {items} do {s_prev} and {s_name} have together?",
        "How many {items} do {s_prev} and {s_name} have in total?",
        "How many {items} do {s_prev} and {s_name} have altogether?",
    ),
    "question": (
        "How many {items} does {s_name} have now?",
        "How many {items} does {s_name} have at the end?",
        "How many {items} does {s_name} have left?",
        "How many {items} does {s_name} end up with?",
    ),
    "distractor": (
        "{O} is {n} years old.",
        "{O} has {n} {other_items}.",
        "Each {container} costs {n} dollars.",
        "{S} also has {n} {other_items}.",
        "{O} has {n} {items} at home.",
        "The {place} is {n} miles away.",
        "{S} walks for {n} minutes.",
        "{S} is {n} years old.",
    ),
}

SINGLE_KINDS: tuple[str, ...] = ("add", "sub", "add_groups", "sub_groups", "mul", "div")
CMP_KINDS: tuple[str, ...] = ("cmp_add", "cmp_sub", "cmp_mul", "cmp_div")
ALL_KINDS: tuple[str, ...] = (*SINGLE_KINDS, *CMP_KINDS, "together")
MULTIPLICATIVE_KINDS: tuple[str, ...] = ("add_groups", "sub_groups", "mul", "cmp_mul")
DIVISION_KINDS: tuple[str, ...] = ("div", "cmp_div")

# Relative frequency of each operation kind where it is allowed and feasible. Comparisons
# are rarer (each moves the story to a new person); `together` can only be the last op.
DEFAULT_KIND_WEIGHTS: dict[str, float] = {
    "add": 1.0,
    "sub": 1.0,
    "add_groups": 1.0,
    "sub_groups": 0.7,
    "mul": 0.7,
    "div": 0.7,
    "cmp_add": 0.4,
    "cmp_sub": 0.4,
    "cmp_mul": 0.4,
    "cmp_div": 0.4,
    "together": 1.5,
}


@dataclass(frozen=True)
class LevelSpec:
    """One difficulty level.

    min_ops/max_ops: number of operations (= solution steps after the first), drawn
    uniformly; kinds: the operation kinds allowed; distractors: irrelevant sentences added;
    require: groups of kinds of which each must occur at least once (e.g. "some
    multiplication and some exact division" at the top level).
    """

    min_ops: int
    max_ops: int
    kinds: tuple[str, ...] = ALL_KINDS
    distractors: int = 0
    require: tuple[tuple[str, ...], ...] = ()


DEFAULT_LEVELS: tuple[LevelSpec, ...] = (
    LevelSpec(1, 2, SINGLE_KINDS, 0),
    LevelSpec(2, 3, ALL_KINDS, 1),
    LevelSpec(3, 4, ALL_KINDS, 1),
    LevelSpec(4, 5, ALL_KINDS, 2, require=(MULTIPLICATIVE_KINDS, DIVISION_KINDS)),
)


@dataclass
class WorldConfig:
    """Everything that defines the world; the default is the embedded demo's world.

    levels: one LevelSpec per level, level 1 first (levels are named "1", "2", ...).
    start_range: the first quantity. amount_range: amounts added, removed or compared.
    groups_range/each_range: "{g} bags with {e} in each". factor_range: multipliers.
    divisor_range: divisors (a division is generated only where it is exact).
    distractor_range: numbers in distractor sentences. max_value: upper bound of every
    intermediate value (and so of answers); values also stay >= 2 (no "1 marbles").
    max_people: most people counted in one story (1 + the number of comparisons).
    test_fraction: share of question-hash space that belongs to the test split.
    names/items/containers/places: the vocabulary. templates: phrasings per operation kind
    (see TEMPLATES for the slots). kind_weights: relative frequency of each kind.
    max_tries: attempts per problem before giving up (a constraint that cannot be met).
    no_shortcuts: reject a story whose answer is also what a program prints that skips some
    of its operations (`shortcut_answers`): a policy that skips sentences, the tiny policy's
    measured failure, must not reach the gold answer by luck, or the search "solves" long
    problems with short wrong programs and self-evolution trains on them.
    """

    levels: tuple[LevelSpec, ...] = DEFAULT_LEVELS
    start_range: tuple[int, int] = (5, 40)
    amount_range: tuple[int, int] = (2, 20)
    groups_range: tuple[int, int] = (2, 6)
    each_range: tuple[int, int] = (2, 12)
    factor_range: tuple[int, int] = (2, 4)
    divisor_range: tuple[int, int] = (2, 5)
    distractor_range: tuple[int, int] = (2, 60)
    max_value: int = 999
    max_people: int = 3
    test_fraction: float = 0.2
    names: tuple[tuple[str, str], ...] = NAMES
    items: tuple[tuple[str, str], ...] = ITEMS
    containers: tuple[tuple[str, str], ...] = CONTAINERS
    places: tuple[str, ...] = PLACES
    templates: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TEMPLATES))
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    max_tries: int = 2000
    no_shortcuts: bool = True

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (written next to the splits so a data set says how it was made)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        d = dict(d)
        if "levels" in d:
            d["levels"] = tuple(
                LevelSpec(
                    **{
                        **lv,
                        "kinds": tuple(lv.get("kinds", ALL_KINDS)),
                        "require": tuple(tuple(g) for g in lv.get("require", ())),
                    }
                )
                for lv in d["levels"]
            )
        for key in ("names", "items", "containers"):
            if key in d:
                d[key] = tuple(tuple(x) for x in d[key])
        for key in ("places",):
            if key in d:
                d[key] = tuple(d[key])
        for key, value in list(d.items()):
            if key.endswith("_range"):
                d[key] = tuple(value)
        if "templates" in d:
            d["templates"] = {k: tuple(v) for k, v in d["templates"].items()}
        return cls(**d)


# --- generation --------------------------------------------------------------------------


@dataclass
class _Sentence:
    """A planned sentence, rendered once the order (with distractors) is known."""

    kind: str
    template: str
    template_id: int
    actor: str  # the person the story is about at this point
    slots: dict[str, Any]
    code: str | None = None  # one line of Python for an operation, None for a distractor


@functools.lru_cache(maxsize=1024)
def _fields(template: str) -> tuple[str, ...]:
    return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f)


def _pick_template(rng: random.Random, cfg: WorldConfig, kind: str, slots: dict[str, Any]) -> tuple[int, str]:
    """A random phrasing of `kind` whose slots are all available (number words exist)."""
    options = [(i, t) for i, t in enumerate(cfg.templates[kind]) if all(f in slots for f in _fields(t))]
    if not options:
        raise ValueError(f"no usable template for {kind!r} with slots {sorted(slots)}")
    return rng.choice(options)


def _number_words(k: int) -> dict[str, str]:
    words = {}
    for key, table in (("k_verb", K_VERB), ("k_times", K_TIMES), ("k_frac", K_FRAC)):
        if k in table:
            words[key] = table[k]
    return words


def _weighted_order(rng: random.Random, kinds: list[str], weights: dict[str, float]) -> Iterator[str]:
    """The kinds in a random order, heavier kinds earlier on average (weighted sampling
    without replacement), lazily: the first feasible kind usually comes first."""
    rest = list(kinds)
    while rest:
        k = rng.choices(rest, weights=[weights.get(x, 1.0) for x in rest])[0]
        yield k
        rest.remove(k)


def _rand(rng: random.Random, lo: int, hi: int) -> int | None:
    return rng.randint(lo, hi) if lo <= hi else None


def _sample_op(rng: random.Random, kind: str, v: int, cfg: WorldConfig) -> tuple[int, dict[str, int]] | None:
    """Parameters of one operation on the current value `v`, and the new value; None where
    the kind cannot apply to `v` within the world's bounds (no negative or huge values,
    no inexact division)."""
    lo_v, hi_v = 2, cfg.max_value
    base = kind[4:] if kind.startswith("cmp_") else kind
    if base == "add":
        a = _rand(rng, cfg.amount_range[0], min(cfg.amount_range[1], hi_v - v))
        return None if a is None else (v + a, {"a": a})
    if base == "sub":
        a = _rand(rng, cfg.amount_range[0], min(cfg.amount_range[1], v - lo_v))
        return None if a is None else (v - a, {"a": a})
    if base in ("add_groups", "sub_groups"):
        g = rng.randint(*cfg.groups_range)
        room = hi_v - v if base == "add_groups" else v - lo_v
        e = _rand(rng, cfg.each_range[0], min(cfg.each_range[1], room // g))
        if e is None:
            return None
        return (v + g * e if base == "add_groups" else v - g * e), {"g": g, "e": e}
    if base == "mul":
        ks = [k for k in range(cfg.factor_range[0], cfg.factor_range[1] + 1) if v * k <= hi_v]
        if not ks:
            return None
        k = rng.choice(ks)
        return v * k, {"k": k}
    if base == "div":
        ks = [
            k for k in range(cfg.divisor_range[0], cfg.divisor_range[1] + 1) if v % k == 0 and v // k >= lo_v
        ]
        if not ks:
            return None
        k = rng.choice(ks)
        return v // k, {"k": k}
    raise ValueError(f"unknown operation kind {kind!r}")


_CODE = {
    "add": "{v} = {v} + {a}",
    "sub": "{v} = {v} - {a}",
    "add_groups": "{v} = {v} + {g} * {e}",
    "sub_groups": "{v} = {v} - {g} * {e}",
    "mul": "{v} = {v} * {k}",
    "div": "{v} = {v} // {k}",
    "cmp_add": "{w} = {v} + {a}",
    "cmp_sub": "{w} = {v} - {a}",
    "cmp_mul": "{w} = {v} * {k}",
    "cmp_div": "{w} = {v} // {k}",
    "together": "{w} = {u} + {v}",
}


def _var(name: str, items: str) -> str:
    return f"{name.lower()}_{items}"


def _try_problem(rng: random.Random, spec: LevelSpec, cfg: WorldConfig) -> dict[str, Any] | None:
    """One attempt at a story for `spec`; None when it hit a dead end (then the caller
    draws again, which keeps the distribution simple to reason about: rejection sampling)."""
    item, items = rng.choice(cfg.items)
    container, containers = rng.choice(cfg.containers)
    other_items = rng.choice([p for _, p in cfg.items if p != items])
    place = rng.choice(cfg.places)
    names = list(cfg.names)
    rng.shuffle(names)
    gender = dict(cfg.names)
    people = [n for n, _ in names[: cfg.max_people]]  # may be counted, in this order
    others = [n for n, _ in names[cfg.max_people :]]  # never counted
    if len(others) < 1:
        raise ValueError("WorldConfig.names must have more names than max_people")
    common = {"items": items, "item": item, "containers": containers, "container": container}

    v = rng.randint(*cfg.start_range)
    actor = people[0]
    counted = [actor]
    values = {actor: v}
    used_numbers = {v}
    tid, tpl = _pick_template(rng, cfg, "intro", {**common, "S": "", "n": v})
    plan = [_Sentence("intro", tpl, tid, actor, {**common, "n": v}, f"{_var(actor, items)} = {v}")]
    kinds_done: list[str] = []
    n_ops = rng.randint(spec.min_ops, spec.max_ops)
    question = None
    for i in range(n_ops):
        last = i == n_ops - 1
        candidates = [
            k
            for k in spec.kinds
            if (k != "together" or (last and len(counted) >= 2))
            and (not k.startswith("cmp_") or len(counted) < cfg.max_people)
        ]
        for kind in _weighted_order(rng, candidates, cfg.kind_weights):
            if kind == "together":
                prev, total = counted[-2], values[counted[-2]] + values[actor]
                if total > cfg.max_value:
                    continue
                slots = {**common, "s_prev": prev, "s_name": actor}
                tid, tpl = _pick_template(rng, cfg, kind, slots)
                code = _CODE[kind].format(w=f"total_{items}", u=_var(prev, items), v=_var(actor, items))
                question = _Sentence(kind, tpl, tid, actor, slots, code)
                v = total
                break
            op = _sample_op(rng, kind, v, cfg)
            if op is None:
                continue
            new_v, params = op
            slots = {**common, **params}
            if "k" in params:
                slots.update(_number_words(params["k"]))
            new = people[len(counted)] if kind.startswith("cmp_") else None
            slots.update({"s_name": actor, "W": new or ""})
            slots["O"] = rng.choice(others)
            tid, tpl = _pick_template(
                rng, cfg, kind, {**slots, "S": "", "s_nom": "", "s_obj": "", "s_pos": ""}
            )
            code = _CODE[kind].format(v=_var(actor, items), w=_var(new, items) if new else "", **params)
            plan.append(_Sentence(kind, tpl, tid, actor, slots, code))
            # Numbers said in words ("twice") are still used by the code: keep them too.
            used_numbers.update(params.values())
            if new:
                actor = new
                counted.append(new)
            values[actor] = v = new_v
            break
        else:
            return None  # no kind applies to this value: draw the whole story again
        kinds_done.append(kind)
    for group in spec.require:
        if not any(k in group for k in kinds_done):
            return None

    # Distractors: distinct numbers that the solution never uses, at random places after the
    # first sentence; each is about the person the story is about at that point.
    dist_numbers: list[int] = []
    pool = [n for n in range(cfg.distractor_range[0], cfg.distractor_range[1] + 1) if n not in used_numbers]
    if len(pool) < spec.distractors:
        return None
    dist_numbers = rng.sample(pool, spec.distractors)
    tids = list(range(len(cfg.templates["distractor"])))
    rng.shuffle(tids)
    tids = (tids * spec.distractors)[: spec.distractors]  # distinct phrasings where possible
    for n, did in zip(dist_numbers, tids):
        pos = rng.randint(1, len(plan))
        at = plan[pos - 1]
        at_actor = at.slots.get("W") or at.actor
        slots = {**common, "n": n, "other_items": other_items, "place": place, "O": rng.choice(others)}
        plan.insert(pos, _Sentence("distractor", cfg.templates["distractor"][did], did, at_actor, slots))

    if question is None:
        qslots = {**common, "s_name": actor}
        qid, qtpl = _pick_template(rng, cfg, "question", qslots)
        question = _Sentence("question", qtpl, qid, actor, qslots)
    return {
        "plan": plan,
        "question": question,
        "answer": v,
        "gender": gender,
        "distractors": dist_numbers,
        "kinds": kinds_done,
        "items": items,
        "final_var": f"total_{items}" if question.kind == "together" else _var(actor, items),
        "answer_people": [question.slots["s_prev"], actor] if question.kind == "together" else [actor],
    }


def shortcut_answers(lines: list[str], final_var: str) -> set[int]:
    """What a straight-line program prints when one or more of its lines after the first
    are left out (every such subset; the first line sets the start and always stays). A
    program whose variable no longer exists fails and is left out of the set.

    Why: the search scores a trajectory by its final answer alone, so a wrong program that
    happens to print the gold answer (19 + 5 - 5 + 19 = 38 for "19, +24, -5, halve, +19")
    counts as a solution and becomes training data. With 2-6 small integers per story such
    coincidences are common; rejecting the stories where skipping sentences lands on the
    gold answer (`WorldConfig.no_shortcuts`) removes the failure the tiny policy actually
    makes. The lines are the world's own generated code (not model output), so they run
    here, not in the sandbox.
    """
    head, ops = lines[0], [compile(line, "<world>", "exec") for line in lines[1:]]
    out: set[int] = set()
    for keep in itertools.product((True, False), repeat=len(ops)):
        if all(keep):
            continue
        env: dict[str, int] = {}
        try:
            exec(head, {}, env)
            for code, k in zip(ops, keep):
                if k:
                    exec(code, {}, env)
            out.add(env[final_var])
        except (NameError, KeyError, ZeroDivisionError):
            continue
    return out


def _draft_lines(draft: dict[str, Any]) -> list[str]:
    lines = [s.code for s in draft["plan"] if s.code is not None]
    return lines + ([draft["question"].code] if draft["question"].code else [])


def _render(s: _Sentence, last_person: str | None, gender: dict[str, str]) -> tuple[str, str | None]:
    """The sentence text and its grammatical subject (a person, or None).

    A pronoun stands for the current person only when the previous sentence was about them;
    an object pronoun also needs the other person in the sentence to be of another gender
    ("Leo gives her 5", but "Ava gives Mia 5").
    """
    a = s.actor
    pron = _PRONOUNS[gender[a]]
    use = last_person == a
    other = s.slots.get("O")
    obj_ok = use and (other is None or gender.get(other) != gender[a])
    slots = {
        **s.slots,
        "S": pron["nom"].capitalize() if use else a,
        "s_nom": pron["nom"],
        "s_pos": pron["pos"],
        "s_obj": pron["obj"] if obj_ok else a,
        "s_name": s.slots.get("s_name", a),
    }
    text = s.template.format(**slots)
    if not s.template.startswith("{"):
        return text, None  # "Each bag costs ...", "How many ...": about no one
    first = _fields(s.template)[0]
    return text, {"S": a, "s_name": slots["s_name"], "O": other, "W": s.slots.get("W")}.get(first)


def _step(k: int, comment: str, code: str) -> str:
    """One code step: `# Step k: ...` restating the sentence, one line of code, the tag."""
    head = steps.CODE_OPEN + "\n" if k == 1 else "\n\n"
    return f"{head}# Step {k}: {comment}\n{code}\n{steps.END_OF_STEP}"


def generate_problem(
    rng: random.Random, level: int, cfg: WorldConfig | None = None, *, pid: str | None = None
) -> Problem:
    """One problem at `level` (1-based) drawn from `rng`, with its reference solution.

    Deterministic given the state of `rng`. `pid` is the id (default: "world:L{level}:" and
    a hash of the question). meta: solution (the SFT response), ops (operation kinds in
    order), phrasings ("kind:template index" of every sentence), distractors (numbers in
    distractor sentences), n_ops.
    """
    cfg = cfg or WorldConfig()
    if not 1 <= level <= cfg.n_levels:
        raise ValueError(f"level must be in 1..{cfg.n_levels}, got {level}")
    spec = cfg.levels[level - 1]
    for _ in range(cfg.max_tries):
        draft = _try_problem(rng, spec, cfg)
        if draft is not None and not (
            cfg.no_shortcuts and draft["answer"] in shortcut_answers(_draft_lines(draft), draft["final_var"])
        ):
            break
    else:
        raise RuntimeError(
            f"could not generate a level-{level} problem in {cfg.max_tries} tries; loosen the config"
        )

    gender = draft["gender"]
    texts, last = [], None
    step_texts, k = [], 0
    for s in draft["plan"]:
        text, last = _render(s, last, gender)
        texts.append(text)
        if s.code is not None:
            k += 1
            step_texts.append(_step(k, text.rstrip("."), s.code))
    q = draft["question"]
    q_text, _ = _render(q, last, gender)
    if q.kind == "together":
        k += 1
        prev, cur = q.slots["s_prev"], q.slots["s_name"]
        step_texts.append(_step(k, f"Add up the {draft['items']} of {prev} and {cur}", q.code or ""))
    question = " ".join([*texts, q_text])

    answer = str(draft["answer"])
    step_texts.append(f"\n\n# Now print the final answer\nprint({draft['final_var']})\n{steps.END_OF_CODE}")
    step_texts[-1] += steps.wrap_output(answer)
    people = draft["answer_people"]
    if len(people) == 2:
        conclusion = f"{people[0]} and {people[1]} have \\boxed{{{answer}}} {draft['items']} together."
    else:
        conclusion = f"{people[0]} has \\boxed{{{answer}}} {draft['items']}."
    step_texts.append(f"\n{steps.ANSWER_OPEN}{conclusion}{steps.END_OF_ANSWER}")
    solution = "".join(step_texts)

    phrasings = [f"{s.kind}:{s.template_id}" for s in draft["plan"]] + [f"{q.kind}:{q.template_id}"]
    return Problem(
        id=pid or f"world:L{level}:{_qhash(question)[:10]}",
        question=question,
        answer=answer,
        level=str(level),
        source="world",
        meta={
            "solution": solution,
            "ops": draft["kinds"],
            "phrasings": phrasings,
            "distractors": draft["distractors"],
            "n_ops": len(draft["kinds"]),
        },
    )


# --- splits ------------------------------------------------------------------------------


def _qhash(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).encode("utf-8")).hexdigest()


def split_of(question: str, cfg: WorldConfig | None = None) -> str:
    """ "train" or "test": fixed by the question text alone (a hash), whatever the seed, so
    the two splits can never share a question."""
    frac = (cfg or WorldConfig()).test_fraction
    return "test" if int(_qhash(question)[:12], 16) / 16**12 < frac else "train"


def make_split(
    split: str,
    n_per_level: int | dict[int, int] | dict[str, int],
    cfg: WorldConfig | None = None,
    seed: int = 0,
) -> list[Problem]:
    """`n_per_level` problems per level of the "train" or "test" split, level 1 first.

    n_per_level is a count for every level or {level: count} (levels not listed get none).
    Problems are drawn from a per-(split, seed, level) random stream and kept only when their
    question hashes to `split` and is new, so the result is deterministic by seed, has no
    duplicate question, and the first n of a longer list equal the list of n. Ids:
    `world-{split}:L{level}:{i}`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cfg = cfg or WorldConfig()
    if isinstance(n_per_level, int):
        counts = {lv: n_per_level for lv in range(1, cfg.n_levels + 1)}
    else:
        counts = {int(lv): int(n) for lv, n in n_per_level.items()}
    out: list[Problem] = []
    seen: set[str] = set()
    for level in sorted(counts):
        rng = random.Random(f"rstar-world:{split}:{seed}:{level}")
        got, draws = 0, 0
        max_draws = 50 * counts[level] + 1000
        while got < counts[level]:
            draws += 1
            if draws > max_draws:
                raise RuntimeError(
                    f"level {level}: only {got} distinct {split} problems in {max_draws} draws; "
                    "the world is too small for this count"
                )
            p = generate_problem(rng, level, cfg)
            key = " ".join(p.question.split())
            if key in seen or split_of(p.question, cfg) != split:
                continue
            seen.add(key)
            p.id = f"world-{split}:L{level}:{got}"
            out.append(p)
            got += 1
    return out


# --- training data -----------------------------------------------------------------------


def seed_sft_records(
    problems: Iterable[Problem], levels: Iterable[int | str] | None = None
) -> list[dict[str, str]]:
    """`{"query", "response"}` records (the authors' SFT format) from reference solutions.

    The demo pre-trains the tiny policy on some of these; which levels is the caller's
    choice (`levels`, default all): seeding only easy levels leaves the hard ones for
    search and self-evolution to reach.
    """
    keep = None if levels is None else {str(lv) for lv in levels}
    return [
        {"query": p.question, "response": p.meta["solution"]}
        for p in problems
        if keep is None or str(p.level) in keep
    ]


def tokenizer_corpus(cfg: WorldConfig | None = None, n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for training the tiny tokenizer: `steps.sft_prompt(question) + solution` for
    `n` problems spread over all levels, plus one text that lists the whole vocabulary (so
    that rare names and phrasings are seen at least once). Its own random stream, so it
    does not depend on (or leak) the splits' draws."""
    cfg = cfg or WorldConfig()
    rng = random.Random(f"rstar-world:corpus:{seed}")
    texts = []
    for i in range(n):
        p = generate_problem(rng, i % cfg.n_levels + 1, cfg)
        texts.append(steps.sft_prompt(p.question) + p.meta["solution"])
    words = (
        [n for n, _ in cfg.names]
        + [w for pair in cfg.items + cfg.containers for w in pair]
        + list(cfg.places)
    )
    words += [*K_VERB.values(), *K_TIMES.values(), *K_FRAC.values()]
    templates = [t for ts in cfg.templates.values() for t in ts]
    texts.append(" ".join(words) + "\n" + "\n".join(templates))
    return texts


def write_world(
    out_dir: str | Path,
    cfg: WorldConfig | None = None,
    n_train_per_level: int | dict[int, int] = 200,
    n_test_per_level: int | dict[int, int] = 50,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `train.jsonl` and `test.jsonl` (one `Problem.to_dict()` per line) and
    `world_config.json` (the config that made them) to `out_dir`; returns their paths by
    name ("train", "test", "config"). The files load with rstar.data.problems."""
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "config": out / "world_config.json"}
    for split, n in (("train", n_train_per_level), ("test", n_test_per_level)):
        probs = make_split(split, n, cfg, seed)
        with paths[split].open("w", encoding="utf-8") as f:
            for p in probs:
                f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    paths["config"].write_text(json.dumps({"seed": seed, **cfg.to_dict()}, indent=1), encoding="utf-8")
    return paths


def code_numbers(solution: str) -> set[int]:
    """Integer literals in the code of a solution (comments and output excluded): what the
    solution *uses*, for checking that distractor numbers are not among them."""
    code = steps.program(steps.split_steps(solution))
    code = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    return {int(x) for x in re.findall(r"\b\d+\b", code)}


# --- the sets of an `rstar evolve` run -------------------------------------------------------


def per_level(counts: list[int], n_levels: int, name: str) -> dict[int, int]:
    """{level: count} from one count for every level or one count per level (level 1 first)."""
    if len(counts) not in (1, n_levels):
        raise RstarError(f"{name}: expected one count or {n_levels} (one per level), got {counts}")
    return {lv: counts[0 if len(counts) == 1 else lv - 1] for lv in range(1, n_levels + 1)}


def world_sets(e: EvolveConfig) -> tuple[list, list, list[dict]]:
    """The embedded world's (training problems, test problems, seed SFT records) of a run with
    these settings; with `evolve.fresh_problems` the training problems are every round's blocks
    in one list (`rstar.evolve.round_shares` cuts it). Seed solutions come from another seed's
    draws, minus any question that is searched. `rstar evolve` writes them to RUN/problems/;
    `rstar model tiny --pretrain --preset P` pre-trains on the same seed records, so its policy
    is the base of `rstar evolve --preset P`."""
    world = WorldConfig()
    # evolve.fresh_problems: one block of train_per_level for each round (the first n of a
    # longer draw are the draw of n, so round 1's block is the pool of a run without it)
    blocks = len(e.rounds) if e.fresh_problems else 1
    counts = per_level(e.train_per_level, world.n_levels, "evolve.train_per_level")
    train = make_split("train", {lv: n * blocks for lv, n in counts.items()}, world, seed=e.world_seed)
    test = make_split(
        "test", per_level(e.test_per_level, world.n_levels, "evolve.test_per_level"), world, seed=e.world_seed
    )
    searched = {p.question for p in train}
    seed_pool = make_split("train", e.seed_counts, world, seed=e.world_seed + 1)
    return train, test, seed_sft_records([p for p in seed_pool if p.question not in searched])
