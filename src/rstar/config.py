"""One config system for every stage: dataclasses with documented fields, YAML presets,
`--config FILE` and `--set section.field=value` overrides.

Every field's `help` says what it does and, where the paper and the authors' code differ,
which one the default follows. `rstar config show --preset NAME` prints them all.

Presets live in `rstar/presets/*.yaml`; a preset may name a `base` preset that it extends.
Resolution order: dataclass defaults < preset (and its bases) < --config file < --set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rstar import RstarError
from rstar.sandbox.settings import SandboxConfig

# The authors drop PPM pairs whose Q margin or edit distance is below these (the defaults of
# `rstar extract ppm` and of each evolve round's pairs).
AUTHORS_MIN_MARGIN = 0.5
AUTHORS_MIN_EDIT_DISTANCE = 20

PRESET_DIR = Path(__file__).parent / "presets"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class SearchConfig:
    mode: str = _f("mcts", "search algorithm: mcts | beam | bon (best-of-N) | greedy")
    rollouts: int = _f(
        16, "MCTS rollouts per problem (paper: 8 in round 1, 16 in rounds 2-4; authors' configs: 48)"
    )
    num_samples: int = _f(
        12, "candidate steps sampled per expansion (authors: 12 data generation, 32 eval MCTS, 8 beam search)"
    )
    answer_samples: int = _f(
        1,
        "samples when expanding a node whose step ended the code (<end_of_code>): its children are final "
        "answers that rarely differ, so the authors keep one",
    )
    max_depth: int = _f(16, "steps after which a trajectory is terminal ('too deep', value -1)")
    c_puct: float = _f(2.0, "UCT exploration constant c in Q(s) + c*sqrt(ln N_parent / N(s))")
    unvisited: str = _f(
        "inf",
        "UCT of an unvisited child that has no PPM value (rounds 1-2): 'inf' (textbook: visit every "
        "child once first) or 'zero' (the authors' code: q = 0 and no exploration term, so the search "
        "goes deep first). A child with a PPM value (rounds 3-4, inference) is ranked by it instead, "
        "and PPM-initialised children start with one visit",
    )
    error_threshold: int = _f(
        1,
        "consecutive code errors that make a node terminal (authors: 2 in round 1, 1 in rounds 2-4 and eval)",
    )
    terminal_guided: bool = _f(
        True,
        "data generation: back up +1/-1 from the graded final answer (rounds 1-4, needs the gold answer)",
    )
    ppm_init: bool = _f(False, "initialise each new node's q with the PPM score of its prefix (rounds 3-4)")
    temperature: float = _f(0.7, "sampling temperature of the policy (greedy mode always uses 0)")
    top_p: float = _f(0.95, "nucleus sampling of the policy")
    max_new_tokens: int = _f(
        512, "token limit of one generated step; a step cut by it is terminal and invalid"
    )
    prompt_style: str = _f(
        "sft", "'sft' (the authors' training prompt) or 'fewshot' (instructions + example, for round 1)"
    )
    stop_at_output: bool = _f(
        False, "also stop at <end_of_output> (round 1: a bootstrap model must not invent the executor output)"
    )
    beam_width: int = _f(8, "step beam search: partial trajectories kept per step (paper: 8 x 8)")
    trajectories: int = _f(
        1, "independent searches per problem, each with its own recorded seed (best-of-N: solutions sampled)"
    )
    seed: int = _f(
        0, "run seed; each problem's search seed derives from it, the problem id and the search index"
    )
    parallel_rollouts: int = _f(
        1,
        "MCTS rollouts descending at once within one search (AlphaZero-style virtual loss; their leaves are "
        "expanded in one batch). 1 = the paper's sequential rollouts; more changes the trees but fills batches",
    )


@dataclass
class ModelConfig:
    policy: str = _f("", "policy: HF path or hub name (or an http(s):// URL of an OpenAI-compatible server)")
    ppm: str = _f("", "reward model directory (PPM, ORM or PQM); empty = none")
    backend: str = _f("hf", "policy backend: hf | vllm | openai")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    max_batch_size: int = _f(64, "sequences per model forward pass (generation and scoring)")
    cpu_threads: int = _f(
        0,
        "torch threads on CPU (0 = torch's default). On a small machine shared with sandbox and grading "
        "workers, 1 avoids threads spinning against each other",
    )
    engine: str = _f(
        "auto",
        "hf backend's generation and value-head scoring: auto (the CPU decode engine of rstar.models.engine "
        "for Qwen2 on CPU: shared prompt KV, continuous batching, prefix cache; else HF generate / one "
        "forward per text) | hf (always HF) | fast (the engine, or an error)",
    )
    prefix_cache_mb: int = _f(
        256,
        "the decode engine's prefix cache (KV of encoded prompts and scored texts, reused by their "
        "children) in MiB, one for the policy and one for the reward model; 0 = off",
    )


@dataclass
class SchedulerConfig:
    max_inflight: int = _f(64, "problems searched concurrently; their pending work is batched together")
    grading_timeout_s: float = _f(5.0, "hard timeout of one answer-equivalence check")


@dataclass
class TrainConfig:
    """One training run (policy SFT or reward model). Paper defaults (authors' README): lr 7e-6,
    2 epochs, global batch 128 (SFT) / 512 pairs (PPM); tiny models need far larger lr."""

    learning_rate: float = _f(7e-6, "peak learning rate (cosine schedule after warmup)")
    epochs: float = _f(2.0, "passes over the data")
    batch_size: int = _f(128, "global batch: sequences (SFT) or pairs (PPM) per optimizer step")
    micro_batch_size: int = _f(8, "per-device batch; gradient accumulation makes up the global batch")
    max_length: int = _f(
        2048, "token limit; reward-model inputs are cut from the left so the scored step stays whole"
    )
    warmup_ratio: float = _f(0.03, "share of steps with linear warmup")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    eval_fraction: float = _f(0.05, "share of the data held out for evaluation (PPM: pairwise accuracy)")
    bf16: str = _f(
        "auto",
        "auto (bf16 autocast on a CUDA device that supports it, else fp32) | true | false; on the "
        "CPU `true` runs the layers in bf16, which trained the tiny policy no faster than fp32",
    )
    seed: int = _f(0, "training seed (data order, held-out split, head initialisation)")
    logging_steps: int = _f(10, "optimizer steps between log lines")
    beta: float = _f(
        0.1,
        "implicit reward only (`rstar train ppm --kind implicit`): DPO's beta, which also scales "
        "its scores (value = tanh(beta x the summed log ratio to the reference policy))",
    )
    sampling: str = _f(
        "random",
        "order of the training examples: random | group_by_length (batches of similar length: "
        "less padding, so faster where lengths vary, but a batch's examples then have more in "
        "common, which can slow learning)",
    )


def _ppm_train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=512, micro_batch_size=8)


def _paper_rounds() -> list[dict]:
    return [{"preset": f"round{i}"} for i in range(1, 5)]


@dataclass
class EvolveConfig:
    """`rstar evolve`: the four rounds of self-evolution (paper section 3.4)."""

    run_dir: str = _f("runs/embedded", "run directory: problems, trees, data sets, checkpoints, report")
    train_problems: str = _f("", "training problem file; empty = the embedded synthetic world's train split")
    test_problems: str = _f("", "test problem file; empty = the embedded world's test split")
    train_per_level: list[int] = _f(
        [60],
        "embedded world: training problems searched per level; one count for every level or one per "
        "level, level 1 first (e.g. [10, 20, 40, 40] spends the search where the policy fails)",
    )
    test_per_level: list[int] = _f(
        [25], "embedded world: test problems per level (one count or one per level)"
    )
    world_seed: int = _f(0, "embedded world: seed of the problem generator")
    seed_levels: list[int] = _f(
        [1, 2], "embedded world: levels whose reference solutions pre-train the base policy"
    )
    seed_per_level: list[int] = _f(
        [400],
        "embedded world: seed solutions per seed level (drawn apart from the searched problems); one "
        "count for every seed level or one per seed level, in the order of seed_levels",
    )
    base_policy: str = _f(
        "", "policy to start from; empty = build a tiny Qwen2 and pre-train it on the seed set"
    )
    policy_size: str = _f(
        "tiny", "size of the tiny policy built when base_policy is empty (rstar.models.tiny.SIZES)"
    )
    vocab_size: int = _f(900, "tokenizer size of the tiny policy")
    bootstrap_policy: str = _f(
        "",
        "round-1 policy (the paper: DeepSeek-Coder-V2 236B); empty = the base policy itself, which then "
        "gets the first round's larger rollout budget instead of a larger model",
    )
    rounds: list[dict] = _f(
        _paper_rounds(),
        "per round: a `preset` whose search section defines the round (round1..round4), then search "
        "fields that override it, e.g. {preset: round1, rollouts: 16}; `sft` and `ppm` mappings set "
        "that round's training fields, e.g. {preset: round4, sft: {epochs: 2}}",
    )
    unsolved_rollouts: list[int] = _f(
        [64, 128], "last round: problems still unsolved are searched again with these rollouts, one pass each"
    )
    unsolved_seeds: int = _f(
        2, "last round: independent trees (distinct seeds) per unsolved problem in each pass"
    )
    sft_init: str = _f(
        "base", "each round's policy is fine-tuned from 'base' (the starting policy) or 'previous'"
    )
    sft_seed_records: int = _f(
        500,
        "embedded world: seed solutions (a fixed sample) added to every round's SFT set, so that a "
        "policy fine-tuned round after round keeps its easy skills; 0 = none, -1 = all",
    )
    sft_repeat: int = _f(
        1,
        "copies of the round's extracted trajectories in its SFT set (1 = the paper); more weighs the "
        "new solutions against a large seed set (sft_seed_records)",
    )
    search_actors: int = _f(
        0,
        "the rounds' training searches run in this many Ray actors of a Ray instance started on this "
        "machine (0 = in this process): each actor is one more search process with its own sandbox and "
        "models. Seeded searches give the same trees either way (with a reward model, up to its float "
        "noise, as between two runs in one process), so this sets speed only (docs/RAY.md)",
    )
    fresh_problems: bool = _f(
        False,
        "each round searches problems no earlier round searched: the embedded world draws "
        "train_per_level x (number of rounds) problems and round r takes the r-th block of each level; "
        "a training problem file is cut into as many blocks per level. Off (the paper): every round "
        "searches the same problems. A small pool searched round after round is learned by heart: "
        "the policy then solves its training problems far more often than unseen ones "
        "(docs/EXPERIMENTS.md E24)",
    )
    frontier: bool = _f(
        False,
        "each round first decodes its training problems greedily with the round's policy, and its "
        "search takes only those greedy decoding gets wrong: what the policy already solves teaches it "
        "nothing (the greedy solutions count for coverage, not for the SFT set)",
    )
    reward_kind: str = _f(
        "ppm",
        "each round's reward model: ppm (the paper's), or implicit (DPO on the same pairs, scored by "
        "the log ratio to the round's policy; docs/EXPERIMENTS.md E10-E11)",
    )
    ppm_pair_rounds: int = _f(
        1,
        "the PPM of round r trains on the preference pairs of this many rounds up to r (1 = the paper: "
        "round r's own; 0 = every round so far, for small runs whose rounds yield few pairs)",
    )
    pair_min_margin: float = _f(
        AUTHORS_MIN_MARGIN,
        "PPM pairs of each round: least Q margin of a pair (the authors' 0.5; rstar extract ppm --min-margin)",
    )
    pair_min_edit_distance: int = _f(
        AUTHORS_MIN_EDIT_DISTANCE,
        "PPM pairs of each round: least Levenshtein distance of pos and neg in characters (the authors' 20, "
        "made for paragraph-long steps; rstar extract ppm --min-edit-distance)",
    )
    eval_samples: int = _f(8, "test evaluation: N of best-of-N and MCTS rollouts (equal complete solutions)")
    eval_top_k: int = _f(4, "test evaluation: trajectories in the final top-K vote")
    eval_search_each_round: bool = _f(
        True,
        "test evaluation: best-of-N + PPM and MCTS + PPM after every round (false: greedy after every "
        "round, the searches after the last one only, which leaves time for a larger test set)",
    )
    compare_size: str = _f(
        "",
        "also pre-train a policy of this size on the same seed set and report its greedy accuracy (the "
        "paper's 'small model beats a large one' in miniature); empty = skip",
    )

    @property
    def seed_counts(self) -> dict[int, int]:
        """{seed level: seed solutions} from seed_levels and seed_per_level."""
        n = self.seed_per_level
        return dict(zip(self.seed_levels, n * len(self.seed_levels) if len(n) == 1 else n))


@dataclass
class Config:
    search: SearchConfig = field(default_factory=SearchConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    ppm: TrainConfig = field(default_factory=_ppm_train_defaults)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# TrainConfig.sampling: the HF Trainer's train_sampling_strategy values that fit one process
# ("batch_rebalance" balances padding across data-parallel ranks).
SAMPLINGS = ("random", "group_by_length")


def validate(cfg: Config) -> None:
    s = cfg.search
    _check(s.mode in ("mcts", "beam", "bon", "greedy"), "search.mode", s.mode, "mcts | beam | bon | greedy")
    _check(s.unvisited in ("inf", "zero"), "search.unvisited", s.unvisited, "inf | zero")
    _check(s.prompt_style in ("sft", "fewshot"), "search.prompt_style", s.prompt_style, "sft | fewshot")
    for name in (
        "rollouts",
        "num_samples",
        "answer_samples",
        "max_depth",
        "error_threshold",
        "beam_width",
        "trajectories",
    ):
        _check(getattr(s, name) >= 1, f"search.{name}", getattr(s, name), "an integer >= 1")
    _check(0 < s.top_p <= 1, "search.top_p", s.top_p, "in (0, 1]")
    _check(s.temperature >= 0, "search.temperature", s.temperature, ">= 0")
    _check(
        cfg.model.backend in ("hf", "vllm", "openai"),
        "model.backend",
        cfg.model.backend,
        "hf | vllm | openai",
    )
    for section in ("pretrain", "sft", "ppm"):
        sampling = getattr(cfg, section).sampling
        _check(sampling in SAMPLINGS, f"{section}.sampling", sampling, " | ".join(SAMPLINGS))
    e = cfg.evolve
    _check(e.sft_repeat >= 1, "evolve.sft_repeat", e.sft_repeat, "1 or more")
    _check(e.search_actors >= 0, "evolve.search_actors", e.search_actors, "0 (this process) or more")
    _check(e.sft_seed_records >= -1, "evolve.sft_seed_records", e.sft_seed_records, "-1 (all), 0 or more")
    _check(
        len(e.seed_per_level) in (1, len(e.seed_levels)) and min(e.seed_per_level, default=0) >= 0,
        "evolve.seed_per_level",
        e.seed_per_level,
        "one count >= 0, or one per seed level",
    )
    for name in ("train_per_level", "test_per_level"):
        counts = getattr(e, name)
        _check(counts and min(counts) >= 0, f"evolve.{name}", counts, "one count >= 0, or one per level")
    _check(e.ppm_pair_rounds >= 0, "evolve.ppm_pair_rounds", e.ppm_pair_rounds, "0 (all rounds) or more")
    _check(e.reward_kind in ("ppm", "implicit"), "evolve.reward_kind", e.reward_kind, "ppm or implicit")
    _check(e.pair_min_margin >= 0, "evolve.pair_min_margin", e.pair_min_margin, "0 or more")
    _check(
        e.pair_min_edit_distance >= 0, "evolve.pair_min_edit_distance", e.pair_min_edit_distance, "0 or more"
    )


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


class ConfigError(RstarError):
    pass


# --- loading -----------------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, where: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    return data


def preset_dict(name: str, _seen: tuple[str, ...] = ()) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    if name in _seen:
        raise ConfigError(f"preset {name!r} extends itself through {' -> '.join(_seen)}")
    data = _read_yaml(path, f"preset {name} ({path})")
    base = data.pop("base", None)
    return _merge(preset_dict(base, (*_seen, name)), data) if base else data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type = Config,
    preset_is_default: bool = False,
) -> Any:
    """Resolve a config: defaults < preset < config file < `section.field=value` overrides.

    A config file's `base: NAME` is its preset: it replaces a command's default preset
    (`preset_is_default`), and naming another preset with `--preset` as well is an error."""
    data: dict = {}
    file_data: dict = {}
    if config_file:
        file_data = _read_yaml(Path(config_file), str(config_file))
        base = file_data.pop("base", None)
        if base is not None:
            if preset and not preset_is_default and str(base) != preset:
                raise ConfigError(
                    f"--preset {preset} and {config_file} (base: {base}) name two presets: drop one "
                    "(a config file's base is its preset)"
                )
            preset = str(base)
    if preset:
        data = _merge(data, preset_dict(preset))
    if file_data:
        data = _merge(data, file_data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        cursor = data
        *path, last = key.strip().split(".")
        for part in path:
            cursor = cursor.setdefault(part, {})
        cursor[last] = yaml.safe_load(raw)  # YAML scalars: 16, 0.5, true, "text"
    return from_dict(cls, data)


def from_dict(cls: type, data: dict, where: str = "", base: Any = None) -> Any:
    """Build a (nested) config dataclass from a mapping, with errors that name the field.

    Fields not in `data` keep their value in `base` (default: the dataclass's defaults, so a
    section with its own defaults, like `ppm`, keeps them when one of its fields is set)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {sorted(where + k for k in unknown)}; known: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a mapping, got {value!r}")
            kwargs[name] = from_dict(tp, value, f"{where}{name}.", base=getattr(base, name))
        else:
            kwargs[name] = _coerce(tp, value, f"{where}{name}")
    try:
        return dataclasses.replace(base, **kwargs)
    except RstarError:
        raise
    except ValueError as e:  # a section that checks itself (SandboxConfig.__post_init__)
        raise ConfigError(f"{where}{e}") from e


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, name) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r}: expected a number")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return tp(value)
    if tp is str:
        return "" if value is None else str(value)
    return value


def describe(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted name, value, help) for every leaf field."""
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, f.metadata.get("help", "")))
    return rows


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    """The config flags every command that runs a search shares."""
    default = f"default: {default_preset}" if default_preset else "default: none, the built-in defaults"
    parser.add_argument(
        "--preset",
        default=None,
        help=f"preset: {', '.join(list_presets())} ({default}; a --config file's `base:` replaces the default)",
    )
    parser.set_defaults(default_preset=default_preset)
    parser.add_argument(
        "--config",
        dest="config_file",
        help="YAML file of config sections; its `base: PRESET` is its preset (an error beside another --preset)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. search.rollouts=32",
    )


def config_from_args(args: argparse.Namespace, cls: type = Config) -> Any:
    """The config a command's flags name: `--preset` (else the command's default preset, which a
    `--config` file's `base:` replaces), `--config`, then each `--set`."""
    default = getattr(args, "default_preset", None)
    preset = args.preset or default
    is_default = not args.preset
    return load_config(preset, args.config_file, args.overrides, cls=cls, preset_is_default=is_default)


# --- CLI: rstar config show ----------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    show = sub.add_parser("show", help="print the resolved config with each field's meaning")
    add_config_arguments(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of the annotated listing")
    show.set_defaults(func=_show)
    lst = sub.add_parser("presets", help="list the presets")
    lst.set_defaults(func=lambda a: print("\n".join(list_presets())))


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    for name, value, help_ in describe(cfg):
        print(f"{name} = {json.dumps(value)}\n    {help_}")
    return 0
