"""`rstar train sft|ppm`: train the policy or the reward model from the command line.

    rstar train sft DATA --model BASE --out DIR      # policy SFT ({"query", "response"})
    rstar train ppm DATA --model SFT_DIR --out DIR   # PPM (pairs); --kind orm | pqm for the baselines

Settings come from the `sft` / `ppm` sections of the config (`--preset`, `--config`,
`--set sft.learning_rate=1e-5`); the short flags below are shorthands for those `--set`s. With
no preset the defaults are the paper's (lr 7e-6, for a 7B model): a small model barely moves at
that rate, and training then warns on stderr (pass `--lr`). `--set model.device=cpu|cuda:N`
picks the device. Stdout carries only the final metrics JSON (the trainer's log goes to
stderr); the model directory also gets `metrics.json` and `rstar_training.json` (provenance).
Multi-GPU: `accelerate launch -m rstar.cli train ...` (docs/GPU.md; the global batch stays
`--batch-size`: per-device batch x gradient accumulation x processes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

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
    sft_help = "fine-tune the policy on {query, response} records (loss on the response only)"
    sft = sub.add_parser(
        "sft",
        help=sft_help,
        description=sft_help[0].upper() + sft_help[1:] + ": the paper's policy SFT (section 3.3). "
        "Writes an HF model directory with metrics.json and rstar_training.json (provenance).",
    )
    _common(sft, base_help="base model: an HF directory or hub name (Qwen2.5-Math-7B in the paper)")
    sft.set_defaults(func=_cmd_sft, section="sft")

    ppm = sub.add_parser(
        "ppm",
        help="train the reward model (PPM; --kind orm|pqm for the baselines)",
        description="Train the process preference model from the SFT policy on per-step preference "
        "pairs {prompt, pos, neg} (pairwise loss, paper section 3.3); --kind orm|pqm for the baselines. "
        "Writes an HF model directory with metrics.json and rstar_training.json (provenance).",
    )
    _common(ppm, base_help="the SFT policy directory the reward model starts from")
    ppm.add_argument(
        "--kind",
        default="ppm",
        choices=["ppm", "orm", "pqm", "implicit"],
        help="ppm: step pairs, pairwise loss (default); orm: whole-solution pairs, pairwise loss; "
        "pqm: {prompt, step, q} records, regression to Q; implicit: the pairs by DPO (--set "
        "ppm.beta=B), scored by the log ratio to the starting policy (docs/EXPERIMENTS.md E10)",
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
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (the learning-rate schedule ends there): smoke runs, "
        "or an equal training budget (make eval-demo)",
    )
    p.add_argument(
        "--save-steps",
        type=int,
        default=None,
        help="write a resumable checkpoint (OUT/checkpoint-STEP) every N optimizer steps (default: none)",
    )
    p.add_argument(
        "--resume-from-checkpoint",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run stopped after a --save-steps checkpoint: a checkpoint directory, or no "
        "value for the last one in --out (same data and settings as the first run)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON line (default: indented JSON)"
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


def _run_options(args: argparse.Namespace) -> dict:
    """The keyword arguments both trainers share: device, steps, checkpoints."""
    ns = argparse.Namespace(preset=args.preset, config_file=args.config_file, overrides=list(args.overrides))
    resume = args.resume_from_checkpoint
    return dict(
        max_steps=args.max_steps,
        device=config_from_args(ns).model.device,
        save_steps=args.save_steps,
        resume_from_checkpoint=True if resume == "last" else resume,
    )


def _print_metrics(args: argparse.Namespace, metrics: dict) -> None:
    print(json.dumps(metrics) if args.json else json.dumps(metrics, indent=2), flush=True)


def _cmd_sft(args: argparse.Namespace) -> int:
    from rstar.training.sft import train_sft

    cfg, options = train_config(args), _run_options(args)
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines: stdout is for the JSON
        metrics = train_sft(args.data, args.model, args.out, cfg, **options)
    _print_metrics(args, metrics)
    return 0


def _cmd_ppm(args: argparse.Namespace) -> int:
    from rstar.training.reward import train_reward

    cfg, options = train_config(args), _run_options(args)
    with contextlib.redirect_stdout(sys.stderr):
        metrics = train_reward(args.data, args.model, args.out, cfg, kind=args.kind, **options)
    _print_metrics(args, metrics)
    return 0
