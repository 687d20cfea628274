"""The vLLM policy backend: `VLLMPolicy`, vLLM's offline engine (`vllm.LLM`) in-process.

The fast backend on GPUs: paged attention, continuous batching, and prefix caching, which
suits tree search, where hundreds of prompts share the problem and the steps above them.
vLLM is an install extra that runs on GPU machines only (it pins its own torch and an older
transformers; docs/GPU.md says how to install it), so it is imported when a `VLLMPolicy` is
built, never by `import rstar`.

How a `generate` call runs: each `GenRequest` becomes one prompt with one `SamplingParams`
(`sampling_kwargs`), and all of them go to one `LLM.generate`, which schedules them
together. The mapping:
- n, temperature, top_p, max_tokens, stop and seed as given. top_k, min_p and penalties
  stay at vLLM's neutral defaults: the search samples with temperature and top_p only, as
  the other backends do (explicit `SamplingParams` are not merged with the model's
  generation_config.json, which may carry Qwen's top_k or repetition_penalty).
- A greedy request (temperature 0) with n > 1 is sent with n = 1 and its one output is
  repeated: greedy samples are identical, and older vLLM versions refuse n > 1 when greedy.
- include_stop_str_in_output=True, so `Completion.text` ends with the stop string that
  ended it (`outputs_to_completions` also appends `stop_reason` if a version ever omits it).
  `finish_reason` "stop" with a string `stop_reason` is "stop"; with none (or a stop token
  id) it is "eos", and an end-of-sequence token's text, if the detokenizer kept it, is cut
  off; "length" is "length".
- skip_special_tokens=False and spaces_between_special_tokens=False: the text keeps added
  and special tokens exactly as the HF backend decodes them (the tiny tokenizer's step tags
  are added tokens; vLLM would otherwise put spaces around them).
- max_new_tokens <= 0 gives an empty "length" completion without asking vLLM (it refuses
  max_tokens < 1).

Seeds: a request's seed is vLLM's per-request seed, and vLLM gives sample i of a seeded
n > 1 request the seed `seed + i`. vLLM samples each request from its own generator, so a
seeded request's samples do not depend on what else is in the call, up to floating-point
differences of batched kernels (vLLM is not batch-invariant by default).

Counters for throughput figures: `tokens_generated` (token ids the engine generated, stop
tokens included; a greedy request's repeated output counts once), `model_seconds` (wall
time inside `LLM.generate`), `calls` (`generate` calls), `sequences` (outputs generated).

The real engine is checked on a GPU machine by bench/vllm_check.py; tests/test_models_vllm.py
checks the mapping and the output conversion without vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rstar import RstarError
from rstar.models.base import Completion, GenRequest

INSTALL_HINT = (
    "vLLM is not installed. It runs on Linux with an NVIDIA GPU and pins its own torch and "
    "transformers: install it in its own virtual environment, together with this project in one "
    "command, so that pip's resolver sees vLLM's pins (docs/GPU.md):\n"
    "  python3.11 -m venv .venv-gpu && . .venv-gpu/bin/activate\n"
    '  pip install "vllm==0.33.0" -e ".[dev]"'
)


def sampling_kwargs(req: GenRequest) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request (the mapping in the
    module docstring). Pure: testable without vLLM."""
    greedy = req.temperature <= 0
    return dict(
        n=1 if greedy else req.n,
        temperature=0.0 if greedy else req.temperature,
        top_p=1.0 if greedy else req.top_p,
        max_tokens=req.max_new_tokens,
        stop=list(req.stop) or None,
        seed=req.seed,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
    )


def outputs_to_completions(
    request_output: Any, n: int, stops: Sequence[str] = (), eos_texts: Sequence[str] = ()
) -> list[Completion]:
    """`n` Completions from one vLLM `RequestOutput` (its `.outputs`: `CompletionOutput`s
    with index, text, token_ids, finish_reason, stop_reason).

    A greedy request was sent with n = 1: its one output is repeated to `n`.
    """
    outs = sorted(request_output.outputs, key=lambda o: o.index)
    completions = []
    for o in outs:
        text, reason = o.text, o.finish_reason
        sr = getattr(o, "stop_reason", None)
        if reason == "stop":
            if isinstance(sr, str) and sr:
                reason = "stop"
                if not text.endswith(sr):  # include_stop_str_in_output=True should make it so
                    text += sr
            else:  # end of sequence (stop_reason None) or a stop token id
                reason = "eos"
                for eos in eos_texts:
                    if eos and text.endswith(eos):
                        text = text[: -len(eos)]
                        break
        elif reason != "length":
            reason = "length"  # "abort" and anything newer: the text is cut short
        completions.append(Completion(text=text, stop_reason=reason, n_tokens=len(o.token_ids)))
    if len(completions) == 1 and n > 1:
        completions = [Completion(c.text, c.stop_reason, c.n_tokens) for c in completions * n]
    if len(completions) != n:
        raise RstarError(f"vLLM returned {len(completions)} outputs for a request of n={n}")
    return completions


def _engine_dtype(dtype: str) -> str:
    """vLLM's dtype for ours: "auto" means bf16 on a GPU, as in the HF backend (vLLM's own
    "auto" keeps the checkpoint's dtype, float32 for the tiny models)."""
    if dtype == "auto":
        return "bfloat16"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise RstarError(f"dtype={dtype!r}: expected auto | bfloat16 | float16 | float32")
    return dtype


class VLLMPolicy:
    """A `Policy` (see `rstar.models.base`) running vLLM's offline engine.

    Args:
        model: a local HF model directory (or a hub name where the hub is reachable).
        dtype: "auto" (bfloat16), "bfloat16", "float16" or "float32".
        gpu_memory_utilization: share of GPU memory vLLM takes (weights + KV cache).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes (the search's
            prompts share the problem and every step above the node).
        tensor_parallel_size: GPUs to shard the model over.
        max_model_len: context length (default: the model's).
        seed: the engine's seed (requests without a seed sample from it).
        **engine_kwargs: passed to `vllm.LLM` as is (e.g. enforce_eager=True).
    """

    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as e:
            raise RstarError(f"{INSTALL_HINT}\n(import vllm: {e})") from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model),
            dtype=_engine_dtype(dtype),
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            seed=seed,
            **engine_kwargs,
        )
        tok = self.llm.get_tokenizer()
        eos = getattr(tok, "eos_token", None)
        self.eos_texts: list[str] = [eos] if isinstance(eos, str) and eos else []
        self.reset_counters()

    def reset_counters(self) -> None:
        self.tokens_generated = 0
        self.model_seconds = 0.0
        self.calls = 0
        self.sequences = 0

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        """For each request, `request.n` completions, in request order (see the module doc)."""
        self.calls += 1
        results = [
            [Completion(text="", stop_reason="length", n_tokens=0) for _ in range(r.n)] for r in requests
        ]
        active = [i for i, r in enumerate(requests) if r.max_new_tokens > 0 and r.n > 0]
        if not active:
            return results
        params = [self._vllm.SamplingParams(**sampling_kwargs(requests[i])) for i in active]
        t0 = time.perf_counter()
        outputs = self.llm.generate([requests[i].prompt for i in active], params, use_tqdm=False)
        self.model_seconds += time.perf_counter() - t0
        for i, out in zip(active, outputs):
            r = requests[i]
            results[i] = outputs_to_completions(out, r.n, r.stop, self.eos_texts)
            self.sequences += len(out.outputs)
            self.tokens_generated += sum(len(o.token_ids) for o in out.outputs)
        return results
