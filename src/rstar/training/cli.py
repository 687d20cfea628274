"""`rstar train sft|ppm`: train the policy or the reward model from the command line.

    rstar train sft DATA --model BASE --out DIR      # policy SFT ({"query", "response"})
    rstar train ppm DATA --model SFT_DIR --out DIR   # PPM (pairs); --kind orm | pqm for the baselines

Settings come from the `sft` / `ppm` sections of the config (`--preset`, `--config`,
`--set sft.learning_rate=1e-5`); the short flags below are shorthands for those `--set`s.
Multi-GPU: `accelerate launch -m rstar.cli train ...` (the global batch stays
`--batch-size`: per-device batch x gradient accumulation x processes).
"""

from __future__ import annotations

import argparse
import json

from rstar.config import TrainConfig, add_config_arguments, config_from_args

# flag -> TrainConfig field
_SHORT_FLAGS = {
    "epochs": ("epochs", float, "passes over the data"),
    "lr": ("learning_rate", float, "peak learning rate"),
    "batch_size": ("batch_size", int, "global batch (sequences for SFT, pairs for PPM)"),
    "micro_batch_size": ("micro_batch_size", int, "per-device batch"),
    "max_length": ("max_length", int, "token limit of one example"),
    "eval_fraction": ("eval_fraction", float, "share of the problems held out"),
    "seed": ("seed", int, "training seed"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    sft = sub.add_parser(
        "sft", help="fine-tune the policy on {query, response} records (loss on the response only)"
    )
    _common(sft, base_help="base model: an HF directory or hub name (Qwen2.5-Math-7B in the paper)")
    sft.set_defaults(func=_cmd_sft, section="sft")

    ppm = sub.add_parser("ppm", help="train the reward model (PPM; --kind orm|pqm for the baselines)")
    _common(ppm, base_help="the SFT policy directory the reward model starts from")
    ppm.add_argument(
        "--kind",
        default="ppm",
        choices=["ppm", "orm", "pqm"],
        help="ppm: step pairs, pairwise loss (default); orm: whole-solution pairs, pairwise loss; "
        "pqm: {prompt, step, q} records, regression to Q",
    )
    ppm.set_defaults(func=_cmd_ppm, section="ppm")


def _common(p: argparse.ArgumentParser, base_help: str) -> None:
    p.add_argument("data", help="training data: a JSON array file (the authors' format) or JSONL")
    p.add_argument("--model", required=True, help=base_help)
    p.add_argument("--out", required=True, help="output directory (an HF model directory)")
    add_config_arguments(p)
    for flag, (field, tp, help_) in _SHORT_FLAGS.items():
        p.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            type=tp,
            default=None,
            help=f"{help_} (= --set SECTION.{field})",
        )
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)"
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the sub-command's section, with the short flags applied last."""
    overrides = list(args.overrides)
    for flag, (field, _, _) in _SHORT_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{args.section}.{field}={value}")
    ns = argparse.Namespace(preset=args.preset, config_file=args.config_file, overrides=overrides)
    return getattr(config_from_args(ns), args.section)


def _cmd_sft(args: argparse.Namespace) -> int:
    from rstar.training.sft import train_sft

    metrics = train_sft(args.data, args.model, args.out, train_config(args), max_steps=args.max_steps)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_ppm(args: argparse.Namespace) -> int:
    from rstar.training.reward import train_reward

    metrics = train_reward(
        args.data, args.model, args.out, train_config(args), kind=args.kind, max_steps=args.max_steps
    )
    print(json.dumps(metrics, indent=2))
    return 0
