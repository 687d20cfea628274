"""A tiny Qwen2 policy, built locally, for tests, benchmarks and the embedded CPU demo.

Real runs use a pretrained model (Qwen2.5-Math-7B in the paper). Everything else in this
project must also run on a 2-core CPU machine with no hub access, so this module builds a
randomly initialised Qwen2ForCausalLM of a few hundred thousand to ten million parameters
and a byte-level BPE tokenizer trained on local text. The result is an ordinary Hugging Face
model directory (config.json, model.safetensors, tokenizer files) that every backend loads
exactly as it would load a real checkpoint, so nothing downstream has a "tiny" code path.

The tokenizer is shaped for a small model learning the step format:
- byte-level, so any text (code, LaTeX, unicode) encodes and decodes losslessly;
- digits are split one by one, so a tiny model can copy and compute numbers digit by digit
  instead of memorising multi-digit tokens;
- each step tag (`steps.STEP_TAGS`) and `<|user|>`, `<|assistant|>` is one token, so that
  stopping at a tag is a single-token check and the tags cost the model one prediction.
  They are *added* tokens but not *special* ones: `decode(..., skip_special_tokens=True)`
  keeps them, because they are content, not control tokens; only pad and eos are special.

Command line: `rstar model tiny --out DIR [--size tiny|small|medium] [--corpus FILE] [--seed N]`
writes random weights; `rstar model tiny --pretrain [--preset P] --out DIR` also pre-trains the
policy on the embedded world's seed set (reference solutions of its seed levels, `pretrain_tiny`),
exactly as `rstar evolve --preset P` pre-trains its base policy (the same model): a small policy
that solves easy world problems, in one to a few minutes on 2 CPU cores. (Shorter pre-training
does not pay: with a third or half of 736 steps the policy had learnt the format but not yet to
copy the question's numbers, and solved none of the easy problems; the loss falls steeply only
after ~300 steps.)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rstar import RstarError, steps

if TYPE_CHECKING:  # keep `rstar model --help` free of torch/transformers imports
    from transformers import PreTrainedTokenizerFast

    from rstar.config import Config

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
# Content tokens that must stay single tokens (steps.USER_TAG is "<|user|>:\n", so the
# tag itself is "<|user|>").
ADDED_TOKENS = [*steps.STEP_TAGS, USER_TOKEN, ASSISTANT_TOKEN]

# Qwen2's pre-tokenizer pattern: `\p{N}` alone makes every digit its own pre-token, so BPE
# can never merge digits; words keep one leading non-letter (usually the space).
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Model presets. Parameter counts with the default 512-token vocabulary (tied embeddings):
# tiny ~0.46M, small ~4.9M, medium ~9.6M (about 20x tiny, for the paper's "a policy ten
# times its size" comparisons). Head dim is 32 for tiny/small and 64 for medium;
# grouped-query attention (fewer kv heads) as in Qwen2.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
    ),
    # two more layers than "tiny" (~1.3M with a 900-token vocabulary); the embedded presets
    # use "tiny" (evolve.policy_size), whose search is faster
    "demo": dict(
        hidden_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=448,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=768,
    ),
    "medium": dict(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=1024,
    ),
}
MAX_POSITIONS = 2048


# --- tokenizer ---------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers.

    The 256 byte symbols are always in the vocabulary (so nothing is ever unknown) and the
    step tags, `<|user|>`, `<|assistant|>`, pad and eos take the first ids; the remaining
    `vocab_size - 256 - 11` ids are BPE merges learnt from `texts` (fewer if the corpus is
    too small to supply them). Padding side is left, as decoder-only batch generation needs.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            # use_regex=False: the split above already did GPT-2-style word splitting.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Listed here so they get the first ids and are never split or merged in training.
        special_tokens=[EOS_TOKEN, PAD_TOKEN, *ADDED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The trainer registers all of them as special; re-register the content tags as plain
    # added tokens (same ids) so that skip_special_tokens=True does not delete them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


# --- corpora -----------------------------------------------------------------------------


def default_corpus(n_problems: int = 200, seed: int = 0) -> list[str]:
    """A small built-in corpus of step-format text for the tokenizer.

    The few-shot instructions and example, plus generated arithmetic word problems written
    as full solutions in the authors' format (prompt, code steps, output, boxed answer), plus
    some generic math prose. The embedded demo retrains the tokenizer on its own world's
    corpus; this one only has to make a sensible default.
    """
    rng = random.Random(seed)
    texts = [steps.FEWSHOT_INSTRUCTIONS, steps.FEWSHOT_EXAMPLE]
    things = ["apples", "books", "coins", "marbles", "stamps", "pencils", "tickets", "cookies"]
    people = ["Alice", "Bob", "Carla", "Deepak", "Elena", "Farid"]
    for _ in range(n_problems):
        a, b, c = rng.randint(2, 99), rng.randint(2, 30), rng.randint(1, 500)
        who, what = rng.choice(people), rng.choice(things)
        op = rng.choice(["+", "-", "*"])
        total = {"+": a * b + c, "-": a * b - c, "*": a * b * c}[op]
        verb = {"+": "finds", "-": "gives away", "*": "multiplies the pile by"}[op]
        question = f"{who} has {a} boxes with {b} {what} each, then {verb} {c}. How many {what} are there?"
        response = (
            f"{steps.CODE_OPEN}\n# Step 1: Count the {what} in the boxes\nboxes = {a} * {b}\n{steps.END_OF_STEP}"
            f"\n\n# Step 2: Apply the change\ntotal = boxes {op} {c}\n{steps.END_OF_STEP}"
            f"\n\n# Now print the final answer\nprint(total)\n{steps.END_OF_CODE}"
            f"{steps.wrap_output(str(total))}\n"
            f"{steps.ANSWER_OPEN}There are \\boxed{{{total}}} {what}.{steps.END_OF_ANSWER}"
        )
        texts.append(steps.sft_prompt(question) + response)
    texts += [
        "Let $x$ be a real number such that $x^2 - 5x + 6 = 0$. Then $(x-2)(x-3) = 0$, so $x = 2$ or $x = 3$.",
        "The sum of the first $n$ positive integers is $\\frac{n(n+1)}{2}$; for $n = 100$ it is $5050$.",
        "import math\nfrom fractions import Fraction\nfrom sympy import symbols, solve, simplify\n",
        "x = symbols('x')\nsolutions = solve(x**2 - 4, x)\nprint(solutions)\n",
        "The probability is $\\frac{3}{8} = 0.375$, and the area is $12\\sqrt{2}$ square units.",
        "def f(n):\n    return n * (n + 1) // 2\n\nresult = sum(f(k) for k in range(1, 11))\n",
    ]
    return texts


def read_corpus(path: str | Path) -> Iterator[str]:
    """Texts from a corpus file: .txt (the whole file is one text), .jsonl or .json records.

    A record gives its `text` field; else `sft_prompt(query) + response` (the authors' SFT
    format); else all its string fields joined by newlines (PPM pairs, problem files).
    """
    path = Path(path)
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
    else:
        raise ValueError(f"corpus must be .txt, .jsonl or .json, got {path.name}")
    for rec in records:
        if isinstance(rec, str):
            yield rec
        elif "text" in rec:
            yield rec["text"]
        elif "query" in rec and "response" in rec:
            yield steps.sft_prompt(rec["query"]) + rec["response"]
        else:
            yield "\n".join(v for v in rec.values() if isinstance(v, str))


# --- model -------------------------------------------------------------------------------


def build_tiny_policy(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    *,
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = 512,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write a randomly initialised Qwen2ForCausalLM and its tokenizer to `out_dir`.

    The tokenizer is trained on `texts` (the built-in `default_corpus()` when None), unless
    a ready `tokenizer` is given: pass the same one to build several sizes that share a
    vocabulary (size comparisons need that). `seed` fixes the initial weights. Returns
    `out_dir`, an ordinary HF model directory.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (expected one of {sorted(SIZES)})")
    if tokenizer is None:
        tokenizer = train_tokenizer(default_corpus() if texts is None else texts, vocab_size=vocab_size)
    config = Qwen2Config(
        # len(tokenizer), not a rounded-up size: a random model samples every id it has,
        # and ids without a token would decode to nothing.
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model_dir: str | Path) -> int:
    """Parameters of a saved model, read from the safetensors headers (no model is built).
    Tied weights are stored, and so counted, once."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                n = 1
                for d in f.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


# --- pre-training on the embedded world ---------------------------------------------------

PRETRAIN_PRESET = "embedded"  # `rstar model tiny --pretrain`'s default recipe: `rstar evolve`'s


def pretrain_tiny(
    out_dir: str | Path,
    cfg: Config | None = None,
    *,
    size: str = "tiny",
    seed: int = 0,
    records: list[dict] | None = None,
    max_steps: int | None = None,
    device: str = "cpu",
) -> dict:
    """Build a tiny policy and pre-train it on the embedded world's seed set; returns the metrics.

    The recipe of `rstar evolve`'s base policy (`evolve.build_base` calls this): a tokenizer
    (`cfg.evolve.vocab_size`) trained on the world's text, a `size` policy with initial weights
    from `seed`, then SFT with `cfg.pretrain` on `records`, by default the seed solutions of a
    run with `cfg`'s evolve settings (`rstar.data.world.world_sets`). `cfg` defaults to the
    embedded preset. Writes `out_dir` (an HF model directory, with `metrics.json` and
    `rstar_training.json`). If `out_dir` already holds a policy pre-trained with the same
    recipe, settings and seed records (their sha256), it is kept and its metrics returned: so
    `rstar model tiny --pretrain --preset quick` finds a quick run's `models/base` already done.
    """
    import tempfile

    from rstar.config import load_config
    from rstar.data.world import WorldConfig, tokenizer_corpus
    from rstar.models import set_cpu_threads
    from rstar.training.common import PROVENANCE_FILE, data_provenance
    from rstar.training.sft import train_sft

    cfg = cfg or load_config(PRETRAIN_PRESET)
    set_cpu_threads(cfg.model)  # as `rstar evolve` trains (the preset's model.cpu_threads)
    if records is None:
        from rstar.data.world import world_sets

        records = world_sets(cfg.evolve)[2]
    recipe = {"size": size, "init_seed": seed, "vocab_size": cfg.evolve.vocab_size, "max_steps": max_steps}
    data_sha = data_provenance(records, records)["sha256"]
    out = Path(out_dir)
    done = out / PROVENANCE_FILE
    if done.exists() and (out / "model.safetensors").exists():
        try:
            old = json.loads(done.read_text())
        except ValueError:
            old = {}
        if (
            old.get("pretrain") == recipe
            and old.get("config") == dataclasses.asdict(cfg.pretrain)
            and (old.get("data") or {}).get("sha256") == data_sha
        ):
            print(
                f"[model] {out}: already pre-trained with these settings; kept", file=sys.stderr, flush=True
            )
            return dict(old.get("metrics") or {})
    print(
        f"[model] pre-training a {size} policy on {len(records)} seed solutions for "
        f"{cfg.pretrain.epochs:g} epochs at lr {cfg.pretrain.learning_rate:g} ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="rstar-tiny-init-") as tmp:
        init = build_tiny_policy(
            Path(tmp) / "init",
            tokenizer_corpus(WorldConfig(), n=1000),
            size=size,
            seed=seed,
            vocab_size=cfg.evolve.vocab_size,
        )
        return train_sft(
            records,
            init,
            out,
            cfg.pretrain,
            max_steps=max_steps,
            device=device,
            provenance={
                "base_model": f"random init (rstar model tiny --size {size} --seed {seed})",
                "pretrain": recipe,
            },
        )


# --- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    tiny_help = "a tiny Qwen2 and a locally trained tokenizer: random weights, or pre-trained with --pretrain"
    p = sub.add_parser(
        "tiny",
        help=tiny_help,
        description="Write a tiny Qwen2 policy and a locally trained tokenizer (an ordinary HF model "
        "directory). Without --pretrain its weights are random: it solves nothing. With --pretrain it "
        "is pre-trained on the embedded world's seed set (reference solutions of levels 1-3, as "
        "`rstar evolve` pre-trains its base policy), a few minutes on 2 CPU cores: a small policy "
        "that solves easy `world` problems, for the README tour and experiments.",
    )
    p.add_argument("--out", required=True, help="output directory (an HF model directory)")
    p.add_argument(
        "--pretrain",
        action="store_true",
        help="pre-train on the embedded world's seed set (the evolve preset's recipe); an --out that "
        "already holds a policy pre-trained with the same settings is kept as it is",
    )
    p.add_argument(
        "--preset",
        default=PRETRAIN_PRESET,
        help=f"--pretrain: the pre-training recipe of this `rstar evolve` preset: its seed set, its "
        f"`pretrain` settings and tokenizer size (default: {PRETRAIN_PRESET}, 3 passes over 6,100 seed "
        "solutions, ~1,150 steps; quick: 2 passes over 4,000, 490 steps)",
    )
    p.add_argument(
        "--seed-problems",
        type=int,
        default=None,
        help="--pretrain: seed solutions per seed level (default: the preset's evolve.seed_per_level; "
        "fewer than ~500 optimizer steps leave a policy that solves nothing)",
    )
    p.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="--pretrain: passes over the seed set (default: the preset's pretrain.epochs)",
    )
    p.add_argument("--size", default="tiny", choices=sorted(SIZES), help="model preset (default: tiny)")
    p.add_argument(
        "--corpus",
        default=None,
        help="text to train the tokenizer on: .txt, .jsonl or .json (default: built-in step-format corpus)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary size (default: 512; with --pretrain the preset's evolve.vocab_size, 900)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default: 0)")
    p.set_defaults(func=_cmd_tiny)


def _cmd_tiny(args: argparse.Namespace) -> int:
    if args.pretrain:
        if args.corpus:
            raise RstarError(
                "--corpus and --pretrain: the pre-trained policy's tokenizer is trained on the world's text"
            )
        from rstar.config import load_config

        cfg = load_config(args.preset)
        e, pre = cfg.evolve, cfg.pretrain
        if args.seed_problems is not None:
            e = dataclasses.replace(e, seed_per_level=[args.seed_problems])
        if args.vocab_size is not None:
            e = dataclasses.replace(e, vocab_size=args.vocab_size)
        if args.epochs is not None:
            pre = dataclasses.replace(pre, epochs=float(args.epochs))
        cfg = dataclasses.replace(cfg, evolve=e, pretrain=pre)
        out = Path(args.out)
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout: the result line
            metrics = pretrain_tiny(out, cfg, size=args.size, seed=args.seed)
        print(
            f"{out}\t{count_parameters(out):,} parameters ({args.size}), pre-trained on "
            f"{metrics['train_examples']} seed solutions: {metrics['steps']} steps, "
            f"eval loss {metrics.get('eval_loss', float('nan')):.3f}"
        )
        return 0
    texts = list(read_corpus(args.corpus)) if args.corpus else None
    vocab = args.vocab_size if args.vocab_size is not None else 512
    out = build_tiny_policy(args.out, texts, size=args.size, seed=args.seed, vocab_size=vocab)
    print(f"{out}\t{count_parameters(out):,} parameters ({args.size})")
    return 0
