"""Reward-model training (paper section 3.3): the PPM, and the ORM and PQM baselines of Table 8.

All three start from the SFT policy with a scalar value head (`rstar.models.ppm`), and all
three read their values through the same tanh the search scores with.

- PPM ("ppm"): step-level preference pairs `{"prompt", "pos", "neg"}` (the authors' format;
  `pos_count`/`neg_count` are ignored). Inputs `prompt + pos` and `prompt + neg` share the
  prefix and differ in the last step. Bradley-Terry loss on the tanh'd values,
  `L = -mean log sigmoid(tanh(r+) - tanh(r-))`: the paper's `-1/(2*2) E[...]` over the 2x2
  pairs of a prefix is exactly the mean over those pairs, so each pair is one record.
  tanh bounds the margin to [-2, 2], so the loss cannot reach 0 (its floor is
  -log sigmoid(2) = 0.127): the price of training the function that is scored. The authors
  train on raw values and score tanh(raw / 5) (their issue #12); we do not.
- ORM ("orm"): the same loss on whole-solution pairs (pos/neg end with `<end_of_answer>`).
- PQM ("pqm"): `{"prompt", "step", "q"}` records, MSE between tanh(raw) and the step's Q.
- Implicit ("implicit", not the paper's): the same pairs through TRL's DPOTrainer, the policy
  `base_model` as the reference; `rstar.models.ppm.ImplicitRewardModel` scores it
  (docs/EXPERIMENTS.md E10: it ranked held-out pairs better than the PPM on the embedded world).

TRL's RewardTrainer does the pairwise training; only its `compute_loss` is replaced, to put
the tanh in. The examples are handed to it tokenized by `rstar.models.ppm.encode` (cut from
the left), so TRL neither appends an EOS nor drops long pairs, and the head reads the same
last token in training as in scoring. The PQM runs on the plain HF Trainer with a small
`compute_loss`.

Held-out evaluation: whole problems are held out (`TrainConfig.eval_fraction`). For pairs
the headline number is `heldout_accuracy`, the share of held-out pairs with
value(pos) > value(neg); for the PQM, `eval_mse`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainingArguments
from trl import RewardConfig, RewardTrainer

from rstar import RstarError, steps
from rstar.models.ppm import (
    CONFIG_KEY,
    IMPLICIT,
    REWARD_KINDS,
    VALUE_ACTIVATION,
    encode,
    init_reward_model,
    pad_right,
    split_ids,
    values_from_logits,
)
from rstar.training.common import (
    Records,
    data_provenance,
    load_records,
    problem_key,
    save_trained,
    select_device,
    split_held_out,
    trainer_arguments,
    warn_small_model_lr,
)

if TYPE_CHECKING:
    from transformers import EvalPrediction, PreTrainedTokenizerBase

    from rstar.config import TrainConfig

log = logging.getLogger(__name__)

PAIR_FIELDS = {"prompt": "str", "pos": "str", "neg": "str"}
PQM_FIELDS = {"prompt": "str", "step": "str", "q": "number"}


# --- losses ------------------------------------------------------------------------------


class PairwiseRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with the Bradley-Terry loss taken on tanh'd values.

    The batch holds the B chosen sequences followed by the B rejected ones (TRL's
    `DataCollatorForPreference`). Outputs for evaluation are the (B, 2) values
    [value(pos), value(neg)], so `predict`/`evaluate` see one row per pair.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits  # (2B, 1)
        pos, neg = values_from_logits(logits).chunk(2)  # (B,), (B,)
        loss = -F.logsigmoid(pos - neg).mean()
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * ((pos + neg) ** 2).mean()
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            acc = self.accelerator.gather_for_metrics((pos > neg).float().mean()).mean()
            margin = self.accelerator.gather_for_metrics((pos - neg).mean()).mean()
            self._metrics[mode]["accuracy"].append(acc.item())
            self._metrics[mode]["margin"].append(margin.item())
        if return_outputs:
            return loss, {"values": torch.stack([pos, neg], dim=1)}  # (B, 2)
        return loss


class ValueRegressionTrainer(Trainer):
    """HF Trainer for the PQM: MSE between tanh(raw) and each step's Q (the `labels`)."""

    # The loss below is a mean over the micro batch: let the Trainer divide it for gradient
    # accumulation (transformers >= 5.19 reads this; older versions read the attribute that
    # __init__ sets below).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        q = inputs["labels"].float()  # (B,)
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        ).logits  # (B, 1)
        values = values_from_logits(logits)  # (B,)
        loss = F.mse_loss(values, q)
        return (loss, {"values": values}) if return_outputs else loss


class _PadValueBatch:
    """Collator for PQM examples: right-padded ids and mask, float Q labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_right([e["input_ids"] for e in examples], self.pad_id)  # (B, T)
        labels = torch.tensor([float(e["labels"]) for e in examples], dtype=torch.float32)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pairwise_accuracy(pred: EvalPrediction) -> dict[str, float]:
    values = np.asarray(pred.predictions)  # (N, 2): [value(pos), value(neg)]
    return {"pairwise_accuracy": float(np.mean(values[:, 0] > values[:, 1]))}


# --- data --------------------------------------------------------------------------------


def _whole_solution(rec: dict) -> str | None:
    """Why an ORM pair is not a whole-solution pair, or None if it is.

    Only the positive can be checked: a correct solution ends with its answer. A negative may
    end anywhere a trajectory can end (a wrong answer, a failed program, the depth or token
    limit: `rstar extract orm --invalid-negatives`). This catches the likely mistake, step
    pairs fed to the ORM, not every malformed pair.
    """
    if not rec["pos"].rstrip().endswith(steps.END_OF_ANSWER):
        return (
            f"field 'pos' is not a whole solution (it does not end with {steps.END_OF_ANSWER}); "
            "an ORM trains on whole-solution pairs"
        )
    return None


def _pair_dataset(recs: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    return Dataset.from_list(
        [
            {
                "chosen_ids": encode(tokenizer, r["prompt"] + r["pos"], max_length),
                "rejected_ids": encode(tokenizer, r["prompt"] + r["neg"], max_length),
            }
            for r in recs
        ]
    )


def _value_dataset(recs: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    return Dataset.from_list(
        [
            {"input_ids": encode(tokenizer, r["prompt"] + r["step"], max_length), "labels": float(r["q"])}
            for r in recs
        ]
    )


# --- training ----------------------------------------------------------------------------


def train_reward(
    data: Records,
    base_model: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    kind: str = "ppm",
    *,
    max_steps: int | None = None,
    device: str = "auto",
    save_steps: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a reward model of `kind` ("ppm", "orm", "pqm" or "implicit") from the SFT policy
    `base_model`.

    `data`: a list of records or a JSON/JSONL file of them (pairs for ppm/orm, `{"prompt",
    "step", "q"}` for pqm). `max_steps`, if given, stops after that many optimizer steps.
    Saves one HF directory to `out_dir` (loadable by `rstar.models.ppm.load_reward_model`) and
    returns the metrics, also written to `out_dir/metrics.json`; `out_dir/rstar_training.json`
    records how it was made. `device`, `save_steps`, `resume_from_checkpoint` and `provenance`
    as in `train_sft`.
    """
    if kind not in (*REWARD_KINDS, IMPLICIT):
        raise RstarError(f"--kind {kind!r}: expected one of {', '.join((*REWARD_KINDS, IMPLICIT))}")
    if kind == "pqm":
        records = load_records(data, PQM_FIELDS, what="PQM data")
        for r in records:
            if not -1.0 <= r["q"] <= 1.0:
                log.warning("a Q value outside [-1, 1] (%s): tanh cannot reach it", r["q"])
                break
    else:
        check = _whole_solution if kind == "orm" else None
        records = load_records(data, PAIR_FIELDS, what="pair data", check=check)
    train_recs, eval_recs = split_held_out(
        records, cfg.eval_fraction, cfg.seed, key=lambda r: problem_key(r["prompt"])
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    used_device = select_device(device)
    torch.manual_seed(cfg.seed)
    targs = trainer_arguments(
        cfg,
        out,
        max_steps=max_steps,
        has_eval=bool(eval_recs) and kind != IMPLICIT,
        device=used_device,
        save_steps=save_steps,
    )
    eval_ds = None
    if kind == IMPLICIT:
        trainer, tokenizer, train_recs, n_tokens = _implicit_trainer(train_recs, base_model, cfg, targs)
    else:
        model, tokenizer = init_reward_model(base_model, kind, max_length=cfg.max_length)
        warn_small_model_lr(model.num_parameters(), cfg, "ppm")
    if kind == "pqm":
        train_ds = _value_dataset(train_recs, tokenizer, cfg.max_length)
        eval_ds = _value_dataset(eval_recs, tokenizer, cfg.max_length) if eval_recs else None
        trainer: Trainer = ValueRegressionTrainer(
            model=model,
            args=TrainingArguments(**targs, remove_unused_columns=False),
            data_collator=_PadValueBatch(tokenizer.pad_token_id),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
        )
        n_tokens = sum(len(x) for x in train_ds["input_ids"])
    elif kind != IMPLICIT:
        train_ds = _pair_dataset(train_recs, tokenizer, cfg.max_length)
        eval_ds = _pair_dataset(eval_recs, tokenizer, cfg.max_length) if eval_recs else None
        trainer = PairwiseRewardTrainer(
            model=model,
            # max_length only filters in TRL; our inputs are already cut to it, so none is dropped.
            args=RewardConfig(**targs, max_length=cfg.max_length),
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            compute_metrics=_pairwise_accuracy,
        )
        n_tokens = sum(len(x) for col in ("chosen_ids", "rejected_ids") for x in train_ds[col])

    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "kind": kind,
        "train_loss": result.training_loss,
        "train_records": len(train_recs),
        "eval_records": len(eval_recs),
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "train_tokens_per_second": n_tokens * (trainer.state.epoch or 0.0) / max(seconds, 1e-9),
    }
    if eval_ds is not None:
        ev = trainer.evaluate()
        if kind == "pqm":
            metrics["eval_mse"] = ev["eval_loss"]
        else:
            metrics["eval_loss"] = ev["eval_loss"]
            metrics["heldout_accuracy"] = ev["eval_pairwise_accuracy"]
    if kind == IMPLICIT:
        reference = Path(str(base_model))
        setattr(
            trainer.model.config,
            CONFIG_KEY,
            {
                "kind": IMPLICIT,
                "activation": VALUE_ACTIVATION,
                "max_length": int(cfg.max_length),
                "beta": float(cfg.beta),
                # a local directory by its absolute path (the model may be read from elsewhere)
                "reference": str(reference.resolve()) if reference.exists() else str(base_model),
            },
        )
    if kind == IMPLICIT and eval_recs:
        # measured after saving, with the scorer the search uses (training and scoring agree)
        trainer.save_model(str(out))
        tokenizer.save_pretrained(str(out))
        metrics["heldout_accuracy"] = _implicit_accuracy(out, eval_recs, used_device, cfg.max_length)
    save_trained(
        trainer,
        tokenizer,
        out,
        metrics,
        kind=kind,
        base_model=base_model,
        data=data_provenance(data, records),
        cfg=cfg,
        device=used_device,
        max_steps=max_steps,
        resumed_from=None if resume_from_checkpoint is None else str(resume_from_checkpoint),
        extra=provenance,
    )
    return metrics


def _implicit_trainer(
    train_recs: list[dict], base_model: str | Path, cfg: TrainConfig, targs: dict[str, Any]
) -> tuple[Trainer, PreTrainedTokenizerBase, list[dict], int]:
    """(trainer, tokenizer, pairs kept, their tokens) for the implicit reward: TRL's DPO trainer
    on the pairs (prompt, chosen = pos, rejected = neg), the reference being `base_model`
    itself. Pairs longer than `cfg.max_length` tokens are left out: TRL's DPO cuts from the
    right, which would cut the step being judged (the scorer cuts from the left)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [
        [len(split_ids(tokenizer, r["prompt"] + r[k], 1 << 30)[0]) for k in ("pos", "neg")]
        for r in train_recs
    ]
    fit = [(r, sum(n)) for r, n in zip(train_recs, lengths) if max(n) <= cfg.max_length]
    kept = [r for r, _ in fit]
    if len(kept) < len(train_recs):
        log.warning(
            "%d of %d pairs are longer than %d tokens: left out",
            len(train_recs) - len(kept),
            len(train_recs),
            cfg.max_length,
        )
    if not kept:
        raise RstarError(f"implicit reward: no training pair fits in max_length {cfg.max_length}")
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["pos"], "rejected": r["neg"]} for r in kept])
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    warn_small_model_lr(model.num_parameters(), cfg, "ppm")
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**targs, beta=cfg.beta, max_length=None),
        train_dataset=ds,
        processing_class=tokenizer,
    )
    return trainer, tokenizer, kept, sum(n for _, n in fit)


def _implicit_accuracy(out: Path, eval_recs: list[dict], device: str, max_length: int) -> float:
    """Share of held-out pairs whose pos gets the larger implicit reward from the saved model."""
    from rstar.models.ppm import ImplicitRewardModel

    scorer = ImplicitRewardModel(out, device=device, max_length=max_length)
    pos = scorer.log_ratios([r["prompt"] + r["pos"] for r in eval_recs])
    neg = scorer.log_ratios([r["prompt"] + r["neg"] for r in eval_recs])
    return sum(a > b for a, b in zip(pos, neg)) / len(eval_recs)
