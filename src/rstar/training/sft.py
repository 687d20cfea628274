"""Policy SFT (paper section 3.3): fine-tune the policy on its best search trajectories.

Data: the authors' `{"query", "response"}` records (JSON array or JSONL). One training
example is `steps.sft_prompt(query) + response`, with the loss on the response tokens only.

Three details decide whether the trained policy behaves at inference as it did in training:
- The prompt is tokenized alone, exactly as the search backends tokenize it before they
  generate, and the response after it; so the model learns from precisely the ids it will be
  continuing. (The authors' train/inference prompts differ by a newline; ours do not.)
- The example ends where the response ends, with `<end_of_answer>`: no EOS and no chat
  template is appended (TRL's SFTTrainer would append EOS to raw text; we hand it token ids,
  which it takes as they are). Generation stops at the step tags, never at an EOS.
- The step tags must each be one token. Real base models (Qwen2.5-Math-7B) spell
  `<end_of_step>` with several BPE tokens, so the missing tags are added to the tokenizer and
  the embeddings grown to match (new rows start at the mean of the old ones, transformers'
  `mean_resizing`). They are added as non-special tokens: they are content, and backends that
  decode with `skip_special_tokens=True` (vLLM's default) must keep them in the text.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar import steps
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
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rstar.config import TrainConfig

log = logging.getLogger(__name__)

SFT_FIELDS = {"query": "str", "response": "str"}


def add_step_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[str]:
    """Make every step tag one token; grow the model's embeddings if the vocabulary grew.

    Returns the tags that were added ([] for a tokenizer that already has them, like the
    tiny one). The embedding matrix only ever grows: checkpoints such as Qwen2.5 carry spare
    rows beyond the tokenizer's length, and shrinking to `len(tokenizer)` would drop them.
    """
    from tokenizers import AddedToken

    def is_one_token(tag: str) -> bool:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        return len(ids) == 1 and tokenizer.decode(ids) == tag

    missing = [t for t in steps.STEP_TAGS if not is_one_token(t)]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return missing


def tokenize_example(tokenizer: PreTrainedTokenizerBase, query: str, response: str) -> dict[str, list[int]]:
    """`input_ids` = prompt ids + response ids; `completion_mask` = 0 on the prompt, 1 on the
    response (TRL turns it into labels of -100 on the prompt)."""
    prompt_ids = tokenizer(steps.sft_prompt(query), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + response_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(response_ids),
    }


def completion_loss(model: Any, inputs: dict, num_items_in_batch: Any = None) -> Any:
    """Next-token cross-entropy over the response tokens only: the LM head runs on just the
    hidden states whose next token has a label, not on every prompt and padding position.

    Why by hand: TRL's SFTTrainer always scores every position through its fused LM-head
    kernel, which off CUDA falls back to a tiled torch path (measured on the tiny policy:
    0.69 s a step against 0.47 s for the plain loss, and this row selection is cheaper still).
    The value equals the model's own loss: summed over labelled tokens, divided by the
    batch's label count (`num_items_in_batch`, which keeps gradient accumulation exact).
    """
    import torch.nn.functional as F

    labels = inputs["labels"]  # [B, T], -100 on the prompt and padding
    hidden = model.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
    ).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]
    keep = targets != -100  # position t predicts token t + 1
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V], N labelled tokens
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    n = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return loss / n


def _cpu_sft_trainer_class() -> type:
    """SFTTrainer with `completion_loss` in place of TRL's fused LM head (CPU runs only)."""
    from trl import SFTTrainer

    class CompletionLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # The Trainer's mixed precision (`bf16: true`) is an autocast that accelerate puts
            # around `model.forward`; `completion_loss` calls the backbone and the LM head
            # itself, so it enters that autocast here (without it bf16 ran as fp32 on the CPU).
            with self.accelerator.autocast():
                loss = completion_loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss

    return CompletionLossSFTTrainer


def build_sft_trainer(
    train_recs: list[dict],
    eval_recs: list[dict],
    base_model: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    max_steps: int | None = None,
    device: str = "auto",
    save_steps: int | None = None,
) -> tuple[Any, PreTrainedTokenizerBase, list[str]]:
    """(SFTTrainer, tokenizer, added step tags), ready to train; `train_sft` runs it. Separate
    so that tests can inspect exactly what the trainer will see (its labels, its tokenizer)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model))
    # fp32 master weights; bf16 (where enabled) is autocast by the Trainer.
    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    added = add_step_tokens(tokenizer, model)
    if added:
        log.info("added %d step tags to the tokenizer: %s", len(added), " ".join(added))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def dataset(recs: list[dict]) -> Dataset:
        return Dataset.from_list([tokenize_example(tokenizer, r["query"], r["response"]) for r in recs])

    eval_ds = dataset(eval_recs) if eval_recs else None
    args = SFTConfig(
        **trainer_arguments(
            cfg,
            out_dir,
            max_steps=max_steps,
            has_eval=eval_ds is not None,
            device=device,
            save_steps=save_steps,
        ),
        max_length=cfg.max_length,  # longer examples keep their start (TRL's only truncation mode)
        completion_only_loss=True,
        packing=False,
        prediction_loss_only=True,  # evaluation reports the loss only
    )
    # On CUDA, TRL's fused LM head (Triton) is the memory-lean choice for a 150k vocabulary;
    # elsewhere it is a slow fallback, so CPU runs use `completion_loss` instead.
    trainer_cls = SFTTrainer if torch.cuda.is_available() and not args.use_cpu else _cpu_sft_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset(train_recs),
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    return trainer, tokenizer, added


def train_sft(
    data: Records,
    base_model: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    *,
    max_steps: int | None = None,
    device: str = "auto",
    save_steps: int | None = None,
    resume_from_checkpoint: str | bool | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune `base_model` on SFT records; save an HF policy directory to `out_dir`.

    `data` is a list of `{"query", "response"}` records or a JSON/JSONL file of them. A share
    `cfg.eval_fraction` of the problems is held out for the loss reported as `eval_loss`.
    `max_steps`, if given, stops after that many optimizer steps (smoke runs and tests).
    Returns the metrics, also written to `out_dir/metrics.json`. The directory loads with
    `HFPolicy(out_dir)`; `out_dir/rstar_training.json` records how it was made (base model, data
    file and sha256, config, versions, metrics; `provenance` adds or replaces entries).
    `device` is `model.device` (`select_device`); `save_steps` keeps resumable checkpoints
    (`out_dir/checkpoint-STEP`), and `resume_from_checkpoint` (a checkpoint directory, or True
    for the last one in `out_dir`) continues from one.
    """
    records = load_records(data, SFT_FIELDS, what="SFT data")
    train_recs, eval_recs = split_held_out(
        records, cfg.eval_fraction, cfg.seed, key=lambda r: problem_key(r["query"])
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used_device = select_device(device)
    trainer, tokenizer, added = build_sft_trainer(
        train_recs,
        eval_recs,
        base_model,
        out,
        cfg,
        max_steps=max_steps,
        device=used_device,
        save_steps=save_steps,
    )
    warn_small_model_lr(trainer.model.num_parameters(), cfg, "sft")
    n_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint or None)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "kind": "sft",
        "train_loss": result.training_loss,
        "train_examples": len(train_recs),
        "eval_examples": len(eval_recs),
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "train_tokens_per_second": n_tokens * (trainer.state.epoch or 0.0) / max(seconds, 1e-9),
        "added_tokens": added,
    }
    if eval_recs:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    save_trained(
        trainer,
        tokenizer,
        out,
        metrics,
        kind="sft",
        base_model=base_model,
        data=data_provenance(data, records),
        cfg=cfg,
        device=used_device,
        max_steps=max_steps,
        resumed_from=None if resume_from_checkpoint is None else str(resume_from_checkpoint),
        extra=provenance,
    )
    return metrics
