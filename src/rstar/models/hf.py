"""The Hugging Face transformers policy backend: `HFPolicy`.

It serves any causal LM that `AutoModelForCausalLM` loads: the tiny local models of
`rstar.models.tiny` on CPU, or Qwen2.5-Math-7B (the paper's policy) on a GPU. vLLM is the
faster backend on GPUs; this one is the reference that runs everywhere.

How a `generate` call runs. The search sends hundreds of (prompt, n) requests per tick, so
the call flattens them into request x sample rows, groups rows that share sampling settings
(one `model.generate` takes one temperature, one top_p, one max_new_tokens, one set of stop
strings), sorts each group by prompt length so that batches carry little padding, and runs
one `model.generate` (KV cache, left padding) per batch of at most `max_batch_size` rows.

How stopping works. A step ends at a tag such as `<end_of_step>`.
- If every stop string is one token of the vocabulary (true of the tiny tokenizer, whose
  tags are added tokens), their ids are passed as extra eos ids: exact and free.
- Otherwise (real tokenizers spell `<end_of_step>` with several tokens) a
  `StopStringCriteria` watches the text. It matches stop strings at the end of the whole
  sequence, prompt included (measured on this project's machines: transformers' stop_strings
  match across the end of the prompt), and every prompt here ends with a tag, so a match can
  begin in the prompt: e.g. a prompt ending in `<end_of_step` plus a generated `>`.
  `_GeneratedStopCriteria` therefore accepts a match only if the stop string occurs in the
  generated text.
- Either way the decoded text is cut right after the first stop string in the generated
  text, so `Completion.text` ends with the stop string that ended it (a token may run past
  the tag, e.g. `p>\\n\\n`; the overhang is dropped).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rstar.models.base import Completion, GenRequest, first_stop

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """Resolve "auto" to cuda if available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Resolve "auto" to bf16 on cuda (the paper's models are trained in bf16) and fp32 on cpu
    (bf16 matmuls are slow on most CPUs and the tiny models gain nothing from them)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected 'auto' or one of {sorted(_DTYPES)})")
    return _DTYPES[dtype]


def load_model(
    auto_cls: Any,
    model: str | Path | Any,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str,
    dtype: str,
    owner: str,
) -> tuple[Any, PreTrainedTokenizerBase, torch.device, torch.dtype]:
    """(model, tokenizer, device, dtype) for a backend: a path is loaded with `auto_cls` onto
    the resolved device and dtype; an already loaded model (with its tokenizer) is used where
    it is ("auto" keeps its device and dtype; nn.Module.to() moves or casts it in place, under
    its owner's feet)."""
    from transformers import AutoTokenizer

    if isinstance(model, (str, Path)):
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        tok = tokenizer or AutoTokenizer.from_pretrained(str(model))
        # device_map loads the weights straight onto the device (no CPU copy of a 7B model).
        return auto_cls.from_pretrained(str(model), dtype=dt, device_map=str(dev)), tok, dev, dt
    if tokenizer is None:
        raise ValueError(f"{owner}(model=<PreTrainedModel>) needs tokenizer=")
    dev = model.device if device == "auto" else resolve_device(device)
    dt = model.dtype if dtype == "auto" else resolve_dtype(dtype, dev)
    return model.to(device=dev, dtype=dt), tokenizer, dev, dt


class _GeneratedStopCriteria:
    """Stop-string criterion that ignores matches reaching into the prompt.

    Wraps transformers' `StopStringCriteria` (vectorised, cheap per step) and, for the rare
    rows it flags, decodes that row's generated tokens once to confirm that a stop string
    occurs there. Records, per row, how many tokens had been generated when it stopped.
    Set `prompt_len` before each `generate` (rows are left padded to one length).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> None:
        from transformers import StopStringCriteria

        self.inner = StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stops))
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = 0
        self.stopped_at: dict[int, int] = {}  # row -> generated tokens when it stopped

    def reset(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.stopped_at = {}

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.inner(input_ids, scores)  # (B,) bool
        if not bool(done.any()):
            return done
        gen = input_ids[:, self.prompt_len :]  # (B, T) generated so far
        for i in done.nonzero().flatten().tolist():
            if i in self.stopped_at:
                continue  # already finished (its new tokens are padding)
            text = self.tokenizer.decode(gen[i], skip_special_tokens=False)
            if first_stop(text, self.stops) is not None:
                self.stopped_at[i] = gen.shape[1]
            else:
                done[i] = False  # the match starts inside the prompt
        return done


class HFPolicy:
    """A `Policy` (see `rstar.models.base`) running a transformers causal LM.

    Args:
        model: a local model directory or a hub name (what `AutoModelForCausalLM` takes),
            or an already loaded `PreTrainedModel` (then `tokenizer` is required), e.g. a
            policy fresh out of training. Generation sets its `generation_config` and the
            tokenizer's padding side.
        tokenizer: the tokenizer, when `model` is an object (default: loaded from `model`).
        device: "auto" (cuda if available, else cpu), or any torch device string.
        dtype: "auto" (bf16 on cuda, fp32 on cpu), "float32", "bfloat16" or "float16".
        max_batch_size: most sequences (request x sample rows) per `model.generate`.
        share_prefix: encode each distinct prompt of a batch once and share its KV cache among
            its samples (`_shared_prefill`); off = plain `generate` (for comparison).
        max_new_tokens_cap: if set, no request generates more than this many tokens.
        stop_mode: "auto" (stop-token ids when every stop string is one token, else
            stop strings), or force "tokens" / "strings" (tests use "strings" to exercise
            that path with a tokenizer whose tags are single tokens).
        engine: "auto" (the decode engine of `rstar.models.engine` where it supports the
            model and device: Qwen2 on CPU; else HF `generate`), "hf" (always HF
            `generate`, the reference) or "fast" (the engine, or an error).
        prefix_cache_mb: the engine's prefix cache bound (KV of encoded prompts, reused by
            later prompts that start with them); 0 = off. Unused by HF `generate`.

    Seeds: transformers samples from one global RNG per `model.generate`, so the per-request
    seeds of a mixed batch cannot each be honoured exactly. Each batch seeds a private RNG
    (the global one is forked and restored) from a hash of its rows' (seed, sample index)
    pairs: the same requests in the same order give the same samples, but a request's samples
    depend on what it was batched with. Requests without seeds use the global RNG.

    Counters for throughput figures: `tokens_generated` (sum of `Completion.n_tokens`),
    `model_seconds` (wall time inside `model.generate`), `calls` (`generate` calls),
    `batches` (`model.generate` calls), `sequences` (rows generated).
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 64,
        share_prefix: bool = True,
        max_new_tokens_cap: int | None = None,
        stop_mode: str = "auto",
        engine: str = "auto",
        prefix_cache_mb: int = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        if stop_mode not in ("auto", "tokens", "strings"):
            raise ValueError(f"stop_mode must be 'auto', 'tokens' or 'strings', got {stop_mode!r}")
        self.share_prefix = share_prefix
        self.model, self.tokenizer, self.device, self.dtype = load_model(
            AutoModelForCausalLM, model, tokenizer, device, dtype, owner="HFPolicy"
        )
        self.model.eval()
        self.max_batch_size = max_batch_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.stop_mode = stop_mode

        tok = self.tokenizer
        tok.padding_side = "left"  # decoder-only: new tokens must follow each prompt directly
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.pad_id: int = tok.pad_token_id
        # End-of-sequence ids: the tokenizer's and the model's (chat models list several).
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        self.eos_ids: list[int] = sorted(eos_ids)
        # A clean generation config: every sampling setting comes from the GenRequest, none
        # from a checkpoint's generation_config.json (Qwen ships top_k, repetition_penalty...).
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids or None, pad_token_id=self.pad_id, bos_token_id=tok.bos_token_id
        )
        self._stop_ids: dict[tuple[str, ...], list[int] | None] = {}
        self._stop_criteria: dict[tuple[str, ...], _GeneratedStopCriteria] = {}
        from rstar.models.engine import select_engine

        self.engine = select_engine(
            engine,
            self.model,
            tok,
            self.device,
            "model",
            eos_ids=self.eos_ids,
            max_rows=max(max_batch_size, 256),
            prefix_cache_mb=prefix_cache_mb,
        )
        self.reset_counters()

    def reset_counters(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.reset_counters()
        self.tokens_generated = 0
        self.model_seconds = 0.0
        self.calls = 0
        self.batches = 0
        self.sequences = 0

    # --- stop handling -----------------------------------------------------------------

    def _single_token_ids(self, stops: tuple[str, ...]) -> list[int] | None:
        """The ids of `stops` if each is exactly one token (so they can act as eos ids)."""
        if stops not in self._stop_ids:
            ids: list[int] | None = []
            for s in stops:
                enc = self.tokenizer.encode(s, add_special_tokens=False)
                if len(enc) != 1 or self.tokenizer.decode(enc) != s:
                    ids = None
                    break
                ids.append(enc[0])
            self._stop_ids[stops] = ids
        return self._stop_ids[stops]

    def _criteria(self, stops: tuple[str, ...]) -> _GeneratedStopCriteria:
        # Building a StopStringCriteria scans the whole vocabulary: once per stop set.
        if stops not in self._stop_criteria:
            self._stop_criteria[stops] = _GeneratedStopCriteria(self.tokenizer, stops)
        return self._stop_criteria[stops]

    # --- generation --------------------------------------------------------------------

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        """For each request, `request.n` completions, in request order (see the class doc)."""
        self.calls += 1
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        if not requests:
            return []
        # Tokenize each distinct prompt once; its n samples share the ids.
        prompts = list(dict.fromkeys(r.prompt for r in requests))
        enc = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        prompt_ids = dict(zip(prompts, enc))
        if self.engine is not None:
            cap = self.max_new_tokens_cap
            e = self.engine
            before = (e.tokens_generated, e.model_seconds, e.decode_steps + e.prefills, e.sequences)
            out = e.generate(
                requests,
                [prompt_ids[r.prompt] for r in requests],
                [r.max_new_tokens if cap is None else min(r.max_new_tokens, cap) for r in requests],
            )
            self.tokens_generated += e.tokens_generated - before[0]
            self.model_seconds += e.model_seconds - before[1]
            self.batches += e.decode_steps + e.prefills - before[2]
            self.sequences += e.sequences - before[3]
            return out

        groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)  # key -> (request, sample)
        for ri, r in enumerate(requests):
            max_new = r.max_new_tokens
            if self.max_new_tokens_cap is not None:
                max_new = min(max_new, self.max_new_tokens_cap)
            sample = r.temperature > 0
            key = (max_new, r.temperature if sample else 0.0, r.top_p if sample else 1.0, tuple(r.stop))
            groups[key].extend((ri, si) for si in range(r.n))

        for (max_new, temperature, top_p, stops), rows in groups.items():
            if max_new <= 0:
                for ri, si in rows:
                    results[ri][si] = Completion(text="", stop_reason="length", n_tokens=0)
                continue
            rows.sort(key=lambda row: len(prompt_ids[requests[row[0]].prompt]), reverse=True)
            for start in range(0, len(rows), self.max_batch_size):
                batch = rows[start : start + self.max_batch_size]
                outs = self._generate_batch(
                    [prompt_ids[requests[ri].prompt] for ri, _ in batch],
                    seeds=[(requests[ri].seed, si) for ri, si in batch],
                    max_new=max_new,
                    temperature=temperature,
                    top_p=top_p,
                    stops=stops,
                )
                for (ri, si), c in zip(batch, outs):
                    results[ri][si] = c
        return results  # type: ignore[return-value]  # every slot is filled above

    def _generate_batch(
        self,
        ids: list[list[int]],
        *,
        seeds: list[tuple[int | None, int]],
        max_new: int,
        temperature: float,
        top_p: float,
        stops: tuple[str, ...],
    ) -> list[Completion]:
        """One `model.generate` over rows that share their sampling settings."""
        from transformers import GenerationConfig, StoppingCriteriaList

        B, L = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # (B, L), left padded
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for i, x in enumerate(ids):
            if x:
                input_ids[i, L - len(x) :] = torch.tensor(x, dtype=torch.long)
                attention_mask[i, L - len(x) :] = 1

        stop_ids = None if self.stop_mode == "strings" else self._single_token_ids(stops)
        if stop_ids is None and self.stop_mode == "tokens" and stops:
            raise ValueError(f"stop_mode='tokens' but not every stop string is one token: {stops}")
        criteria = None
        if stop_ids is None and stops:
            criteria = self._criteria(stops)
            criteria.reset(L)
        end_ids = set(self.eos_ids) | set(stop_ids or [])
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=sample,
            # top_k=0 disables transformers' default top-k of 50: requests specify top_p only.
            **(dict(temperature=temperature, top_p=top_p, top_k=0) if sample else {}),
            eos_token_id=sorted(end_ids) or None,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        kwargs: dict[str, Any] = {}
        if criteria is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])

        seed = _batch_seed(seeds)
        t0 = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.random.fork_rng(devices=_rng_devices(self.device), enabled=seed is not None),
        ):
            if seed is not None:
                torch.manual_seed(seed)
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            if self.share_prefix and L > 1 and len({tuple(x) for x in ids}) < B:  # some prompt repeats
                kwargs[self._cache_kwarg()] = self._shared_prefill(ids, input_ids, attention_mask)
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                **kwargs,
            )
            gen = out[:, L:]  # (B, T) generated ids, T <= max_new
            # Where each row ended: its first end id (eos, or a stop token), else it ran to T.
            is_end = torch.isin(
                gen, torch.tensor(sorted(end_ids), dtype=gen.dtype, device=gen.device)
            )  # (B, T)
            has_end = is_end.any(dim=1)  # (B,)
            first_end = torch.where(has_end, is_end.int().argmax(dim=1), gen.shape[1] - 1)  # (B,)
            ended_by = gen.gather(1, first_end[:, None])[:, 0]  # (B,) the token at that place
            gen, has_end, first_end, ended_by = (t.tolist() for t in (gen, has_end, first_end, ended_by))
            # (.tolist() also waits for the device, so the clock below is honest)
        self.model_seconds += time.perf_counter() - t0
        self.batches += 1
        self.sequences += B

        # Per row: how many tokens it generated, why it ended, and the ids of its text.
        lengths, reasons, text_ids = [], [], []
        strip = set(self.eos_ids) | {self.pad_id}
        for i, row in enumerate(gen):
            n, reason = first_end[i] + 1, "length"
            if has_end[i]:
                is_stop = stop_ids is not None and ended_by[i] in stop_ids
                reason = "stop" if is_stop else "eos"
            if criteria is not None and criteria.stopped_at.get(i, n + 1) <= n:
                n, reason = criteria.stopped_at[i], "stop"
            lengths.append(n)
            reasons.append(reason)
            text_ids.append([t for t in row[:n] if t not in strip])
        texts = self.tokenizer.batch_decode(text_ids, skip_special_tokens=False)

        completions = []
        for text, n, reason in zip(texts, lengths, reasons):
            cut = first_stop(text, stops)
            if cut is not None:
                text, reason = text[:cut], "stop"
            elif reason == "stop":
                reason = "length"  # cannot happen (the stop token decodes to its string); be safe
            completions.append(Completion(text=text, stop_reason=reason, n_tokens=n))
            self.tokens_generated += n
        return completions

    def _cache_kwarg(self) -> str:
        """transformers 5.2x renamed the cache argument `past_key_values` to `cache`."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def _shared_prefill(
        self, ids: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Any:
        """The KV cache of every row's prompt but its last token, computed once per distinct
        prompt and repeated for its samples (the n samples of a request share their prompt;
        without this, `generate` encodes the same prompt n times). transformers has no prefix
        cache of its own (vLLM does); this is the part of one that matters here."""
        from transformers import DynamicCache

        first: dict[tuple[int, ...], int] = {}
        index = [first.setdefault(tuple(x), i) for i, x in enumerate(ids)]
        rows = sorted(set(index))  # one row per distinct prompt
        pos = {r: k for k, r in enumerate(rows)}
        u_ids, u_mask = input_ids[rows, :-1], attention_mask[rows, :-1]  # (U, L-1)
        # generate() derives positions from the mask under left padding; the prefill must too
        positions = (u_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        self.model(
            input_ids=u_ids,
            attention_mask=u_mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg(): cache},
        )
        cache.reorder_cache(
            torch.tensor([pos[i] for i in index], device=input_ids.device)
        )  # (U, ...) -> (B, ...)
        return cache


def _batch_seed(seeds: list[tuple[int | None, int]]) -> int | None:
    """A seed for a whole batch from its rows' (request seed, sample index), or None if no
    row has a seed. sha256, not hash(): the same batch must give the same seed in every run."""
    if all(s is None for s, _ in seeds):
        return None
    digest = hashlib.sha256(repr(seeds).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state fork_rng must save and restore."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
