"""The process preference model (paper section 3.3) and its two ablation baselines, as reward models.

What a reward model is here. The fine-tuned policy with its LM head replaced by a scalar
value head: `AutoModelForSequenceClassification` with `num_labels=1` (for Qwen2 that is
`Qwen2ForSequenceClassification`, a bias-free linear `score` head read at the last non-pad
token), followed by tanh, so values lie in [-1, 1] like the Q values of the search tree. The
three kinds share the architecture, the input format and the scoring code; they differ only in
what they were trained on and with which loss (`rstar.training.reward`):

- "ppm": step-level preference pairs, Bradley-Terry loss (the paper's PPM);
- "orm": whole-solution preference pairs, same loss (outcome reward model baseline);
- "pqm": pointwise regression of each step's Q value, MSE loss (Q-value baseline).

A fourth kind is not a value head: "implicit" (`ImplicitRewardModel`), an implicit process
reward (Yuan et al., "Free Process Rewards without Process Labels", 2024): the policy trained
with DPO on the same pairs, whose value of a text is tanh(beta x the sum, over the response's
tokens, of log pi(token) - log pi_ref(token)), pi_ref the policy it started from. On this
project's embedded world it ranked held-out pairs better than the PPM did (docs/EXPERIMENTS.md,
E10), because it reads the LM head's token probabilities rather than one hidden state.

Input format. A step is scored as the text `prefix + step`, concatenated exactly (the prefix
is the prompt and the earlier steps; the step text carries its own tags), the same text the
training pairs give as `prompt + pos`. Texts longer than the model's limit are cut from the
LEFT, so the step at the end, and the last token the head reads, are never cut.

Invariants that keep training and scoring the same function:
- `encode` is the one tokenizer call, used by training and scoring alike;
- `VALUE_ACTIVATION` (tanh) is applied by `values_from_logits`, used by the training losses
  and by `HFRewardModel.score`. (The authors' code trains on the raw head output and scores
  with tanh(raw / 5), their issue #12: a model that ranks well on raw values but whose tanh'd
  values cluster near 0 or +-1. Here both sides apply the same tanh.)
- sequences are right padded, so every real token keeps its position and attention, and the
  head reads the last real token (transformers finds it as the rightmost id != pad_token_id,
  so a text must not end with the pad token; step texts end with a tag).

Self-describing checkpoints. The value transform, the kind and the training length limit are
recorded in the model config (`config.rstar_reward`), and the head is an ordinary weight of the
same safetensors file: a saved directory loads with `from_pretrained` alone, with no side file
(the authors' separate `value_head.bin`) that can go missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rstar import RstarError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REWARD_KINDS = ("ppm", "orm", "pqm")  # value heads (init_reward_model)
IMPLICIT = "implicit"  # a DPO-trained causal LM scored against its reference (ImplicitRewardModel)
CONFIG_KEY = "rstar_reward"  # the model-config attribute that marks a reward-model directory
VALUE_ACTIVATION = "tanh"
DEFAULT_MAX_LENGTH = 2048


def values_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The reward value of each sequence: tanh of the head's raw output, in float32.

    logits: (B, 1) from the sequence-classification head -> (B,) values in [-1, 1]. Training
    losses and scoring both call this, so the two never disagree about the transform.
    """
    return torch.tanh(logits.float().squeeze(-1))


def encode(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """Token ids of `text`, cut from the left to at most `max_length` ids.

    The end of the text is the step being scored, so the cut falls on the oldest context.
    A leading BOS (for tokenizers that add one; Qwen's does not) is kept in front. If the
    step alone is longer than `max_length`, its own beginning is cut too: the last tokens,
    which the value head reads, always stay.
    """
    # verbose=False: a long text is expected here (it is cut below), not an indexing error.
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) <= max_length:
        return ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos:
        return [bos] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]


def pad_right(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T) with T the longest row, padded on the right.

    Right padding leaves each row's real tokens at positions 0..n-1, exactly as when the row
    is scored alone (left padding would shift the positions of a model called without
    position_ids), so a value does not depend on what it was batched with.
    """
    T = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        input_ids[i, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        attention_mask[i, : len(x)] = 1
    return input_ids, attention_mask


def reward_info(config: Any) -> dict | None:
    """The `rstar_reward` record of a model config, or None if the model is not a reward model."""
    info = getattr(config, CONFIG_KEY, None)
    return dict(info) if isinstance(info, dict) else None


def init_reward_model(
    policy: str | Path,
    kind: str = "ppm",
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh reward model initialised from a fine-tuned policy directory, and its tokenizer.

    The backbone weights come from the policy (the paper initialises the PPM from the SFT
    policy); the policy's LM head is dropped and a scalar `score` head is added. The head is
    zero-initialised: every value starts at tanh(0) = 0, where tanh has its full slope. A
    random head on a 7B model's hidden states (which carry large outlier features) can start
    saturated, with tanh's gradient near 0.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if kind not in REWARD_KINDS:
        raise RstarError(f"reward model kind {kind!r}: expected one of {', '.join(REWARD_KINDS)}")
    tokenizer = AutoTokenizer.from_pretrained(str(policy))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_head_swap():
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=dtype)
    with torch.no_grad():
        model.score.weight.zero_()
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    # Sequence-classification models locate the last real token through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    setattr(
        model.config,
        CONFIG_KEY,
        {"kind": kind, "activation": VALUE_ACTIVATION, "max_length": int(max_length)},
    )
    return model, tokenizer


def _quiet_head_swap() -> Any:
    """Silence the expected 'score.weight missing / lm_head.weight unexpected' load report when
    a causal-LM checkpoint is loaded as a sequence classifier (TRL's helper, when present)."""
    import contextlib

    try:
        from trl.trainer.reward_trainer import suppress_seqcls_warning
    except ImportError:  # an older or newer TRL without it: the report is only noise
        return contextlib.nullcontext()
    return suppress_seqcls_warning()


class _Scorer:
    """What the reward-model classes share: `score` (the `RewardModel` protocol) on top of their
    `score_texts`, and the counters they keep."""

    def _start_counters(self) -> None:
        self.calls = 0
        self.texts_scored = 0
        self.tokens_scored = 0
        self.model_seconds = 0.0

    def score(self, prefixes: list[str], steps: list[str]) -> list[float]:
        """Value in [-1, 1] of each step given its prefix (prompt + earlier steps): the value of
        the text prefix + step."""
        if len(prefixes) != len(steps):
            raise ValueError(f"score: {len(prefixes)} prefixes but {len(steps)} steps")
        return self.score_texts([p + s for p, s in zip(prefixes, steps)])

    def score_texts(self, texts: list[str]) -> list[float]:
        raise NotImplementedError


class HFRewardModel(_Scorer):
    """A `RewardModel` (see `rstar.models.base`): PPM, ORM or PQM, all scored the same way.

    Args:
        model: a reward-model directory written by `rstar train ppm` (its config carries
            `rstar_reward`), or a loaded sequence-classification model (then `tokenizer` is
            required), e.g. one fresh out of training.
        tokenizer: the tokenizer, when `model` is an object.
        device: "auto" (cuda if available, else cpu) or a torch device string.
        dtype: "auto" (bf16 on cuda, fp32 on cpu), "float32", "bfloat16" or "float16".
        max_batch_size: most sequences per forward pass.
        max_length: token limit of a scored text (default: the limit it was trained with).
        engine: "hf" (one forward of the whole text per score, the reference), "auto" (the
            policy's CPU engine, `rstar.models.engine`, where it supports the model) or "fast"
            (the engine, or an error). The engine keeps each scored text's KV in a prefix
            cache: a search scores a node, then its children, whose texts start with the
            node's, so a child costs its step's tokens rather than the whole prompt and every
            earlier step. Values agree with "hf" to float rounding (a test).
        prefix_cache_mb: the engine's prefix cache bound.

    `score` sorts texts by length so that a batch carries little padding, and returns the
    values in input order. Counters: `calls`, `texts_scored`, `tokens_scored` (tokens run
    through the model: with the engine, only those not found in the cache), `model_seconds`.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 64,
        max_length: int | None = None,
        engine: str = "hf",
        prefix_cache_mb: int = 256,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from rstar.models.hf import load_model

        if isinstance(model, (str, Path)):
            path = Path(model)
            if not (path / "config.json").exists():
                raise RstarError(f"{path}: not a model directory (no config.json)")
            info = reward_info(AutoConfig.from_pretrained(str(path)))
            if info is None:
                raise RstarError(
                    f"{path}: not a reward-model directory (its config.json has no {CONFIG_KEY!r}); "
                    "train one with `rstar train ppm DATA --model SFT_DIR --out DIR`"
                )
        else:
            info = reward_info(model.config)
            if info is None:
                raise ValueError(f"the model's config has no {CONFIG_KEY!r}: build it with init_reward_model")
        self.model, self.tokenizer, self.device, self.dtype = load_model(
            AutoModelForSequenceClassification, model, tokenizer, device, dtype, owner="HFRewardModel"
        )
        if info.get("activation", VALUE_ACTIVATION) != VALUE_ACTIVATION:
            raise RstarError(f"reward model activation {info.get('activation')!r}: only 'tanh' is supported")
        self.kind: str = info.get("kind", "ppm")
        self.max_length = int(max_length or info.get("max_length") or DEFAULT_MAX_LENGTH)
        self.max_batch_size = max_batch_size
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id: int = self.tokenizer.pad_token_id
        self.model.config.pad_token_id = self.pad_id
        from rstar.models.engine import select_engine

        self.engine = select_engine(
            engine,
            self.model,
            self.tokenizer,
            self.device,
            "reward model",
            eos_ids=[],
            prefix_cache_mb=prefix_cache_mb,
        )
        self._start_counters()

    def score_texts(self, texts: list[str]) -> list[float]:
        """Value in [-1, 1] of each whole text (its last token is the one the head reads)."""
        self.calls += 1
        if not texts:
            return []
        ids = [encode(self.tokenizer, t, self.max_length) for t in texts]
        if self.engine is not None and all(ids):
            e = self.engine
            before, t0 = e.prefix_tokens_encoded, time.perf_counter()
            with torch.inference_mode():
                hidden = e.encode_last(ids, batch_size=self.max_batch_size)  # (U, h)
                # the head of `AutoModelForSequenceClassification` (Qwen2's `score`), read at
                # the last token as its own forward does
                values = values_from_logits(self.model.score(hidden)).tolist()
            self.model_seconds += time.perf_counter() - t0
            self.tokens_scored += e.prefix_tokens_encoded - before
            self.texts_scored += len(texts)
            return values
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        out = [0.0] * len(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                rows = order[start : start + self.max_batch_size]
                input_ids, attention_mask = pad_right([ids[i] for i in rows], self.pad_id)  # (B, T) each
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
                ).logits  # (B, 1)
                for i, v in zip(rows, values_from_logits(logits).tolist()):
                    out[i] = v
                self.tokens_scored += int(attention_mask.sum())
        self.model_seconds += time.perf_counter() - t0
        self.texts_scored += len(texts)
        return out


def response_start(text: str) -> int:
    """Where the response of a scored text begins: at the newline before the assistant header,
    where the authors' pair prompts end (`steps.ppm_prompt`; the whole-solution `pos`/`neg`
    begin there). 0 for a text without the header (all of it is response)."""
    from rstar.steps import ASSISTANT_HEADER

    i = text.find("\n" + ASSISTANT_HEADER)
    return i if i >= 0 else 0


def split_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> tuple[list[int], int]:
    """(token ids, index of the first response token) of a text for the implicit reward, as
    TRL's DPO trainer tokenizes a prompt and its completion: the whole text at once, the
    completion starting where those ids leave the prompt's own ids (a token merged across the
    seam counts as the completion's). Cut from the LEFT to `max_length`, so the end is kept."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    cut = response_start(text)
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"] if cut else []
    first = 0
    while first < min(len(head), len(ids)) and head[first] == ids[first]:
        first += 1
    drop = max(0, len(ids) - max_length)
    return ids[drop:], max(0, first - drop)


class ImplicitRewardModel(_Scorer):
    """A `RewardModel` of kind "implicit" (module doc): value(text) = tanh(beta * sum over the
    response's tokens of log pi - log pi_ref), in [-1, 1] like the PPM's values (the response
    starts at `response_start`; a text without the assistant header is all response). A step's
    value is that of prefix + step: the partial solution's cumulative implicit reward, which is
    what MCTS's q-initialisation and best-of-N read.

    Args:
        path: a directory written by `rstar train ppm --kind implicit` (its config's
            `rstar_reward` names the reference policy and beta).
        device, dtype, max_batch_size, max_length: as for `HFRewardModel` (both models score
            every text, each forward pass materialises (B, T, vocab) logits: keep batches small).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from rstar.models.hf import load_model

        info = reward_info(AutoConfig.from_pretrained(str(path))) or {}
        if info.get("kind") != IMPLICIT:
            raise RstarError(f"{path}: not an implicit reward model (rstar_reward kind {info.get('kind')!r})")
        reference = str(info.get("reference") or "")
        if not reference:
            raise RstarError(f"{path}: its rstar_reward names no reference policy")
        self.model, self.tokenizer, self.device, self.dtype = load_model(
            AutoModelForCausalLM, path, None, device, dtype, owner="ImplicitRewardModel"
        )
        try:
            self.reference, _, _, _ = load_model(
                AutoModelForCausalLM, reference, self.tokenizer, device, dtype, owner="ImplicitRewardModel"
            )
        except OSError as e:
            raise RstarError(f"{path}: its reference policy {reference!r} does not load: {e}") from e
        self.kind = IMPLICIT
        self.beta = float(info.get("beta", 0.1))
        self.max_length = int(max_length or info.get("max_length") or DEFAULT_MAX_LENGTH)
        self.max_batch_size = max_batch_size
        self.model.eval()
        self.reference.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id: int = self.tokenizer.pad_token_id
        self._start_counters()

    def log_ratios(self, texts: list[str]) -> list[float]:
        """Sum over each text's response tokens of log pi - log pi_ref (unscaled)."""
        enc = [split_ids(self.tokenizer, t, self.max_length) for t in texts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]), reverse=True)
        out = [0.0] * len(enc)
        with torch.inference_mode():
            for start in range(0, len(order), self.max_batch_size):
                rows = order[start : start + self.max_batch_size]
                ids, mask = pad_right([enc[i][0] for i in rows], self.pad_id)  # (B, T) each
                ids, mask = ids.to(self.device), mask.to(self.device)
                # token t+1's log-probability under each model, (B, T-1)
                gathered = [
                    m(input_ids=ids, attention_mask=mask)
                    .logits[:, :-1]
                    .float()
                    .log_softmax(-1)
                    .gather(-1, ids[:, 1:, None])[..., 0]
                    for m in (self.model, self.reference)
                ]
                ratio = (gathered[0] - gathered[1]) * mask[:, 1:]
                pos = torch.arange(ratio.shape[1], device=ratio.device)[None, :] + 1  # predicted token
                first = torch.tensor([enc[i][1] for i in rows], device=ratio.device)[:, None]
                sums = (ratio * (pos >= first)).sum(-1)
                for i, v in zip(rows, sums.tolist()):
                    out[i] = v
                self.tokens_scored += int(mask.sum())
        return out

    def score_texts(self, texts: list[str]) -> list[float]:
        """Value in [-1, 1] of each whole text: tanh(beta * its summed log ratio)."""
        self.calls += 1
        if not texts:
            return []
        t0 = time.perf_counter()
        values = [math.tanh(self.beta * r) for r in self.log_ratios(texts)]  # float64: less saturation
        self.model_seconds += time.perf_counter() - t0
        self.texts_scored += len(texts)
        return values


def load_reward_model(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 64,
    engine: str = "hf",
    prefix_cache_mb: int = 256,
) -> HFRewardModel | ImplicitRewardModel:
    """Load a PPM, ORM, PQM or implicit reward directory (what `rstar.models.load_reward` calls;
    `engine` and `prefix_cache_mb` as in `HFRewardModel`, value heads only)."""
    from transformers import AutoConfig

    if (Path(path) / "config.json").exists():
        info = reward_info(AutoConfig.from_pretrained(str(path))) or {}
        if info.get("kind") == IMPLICIT:
            return ImplicitRewardModel(
                path, device=device, dtype=dtype, max_batch_size=min(max_batch_size, 16)
            )
    return HFRewardModel(
        path,
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        engine=engine,
        prefix_cache_mb=prefix_cache_mb,
    )
