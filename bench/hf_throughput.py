"""HF backend throughput at a real model's shape: step expansions and tokens per second.

Builds a randomly initialised Qwen2 with the layer shapes of a real policy (no download;
the vocabulary is the tiny world tokenizer's, so the LM head is far smaller than Qwen's
152k: the figures are for the transformer body) and times `HFPolicy.generate` on a
search-like workload: `--requests` prompts (world problems with 0-3 solution steps, the
SFT prompt format), `n` samples each, temperature 1, the three step stop strings. It runs
the workload with the shared-prefix prefill on and off, alternating, twice round.

    python bench/hf_throughput.py --shape qwen2.5-math-7b --requests 64 --n 8   # a GPU
    python bench/hf_throughput.py --shape tiny --requests 16 --n 4               # CPU check

Random weights seldom emit a stop tag, so most samples run to `--max-new-tokens`: the
tokens/s figure is what counts (each real step is 30-100 tokens). Prints one line per run
and a JSON summary (also to $OUT/hf_throughput.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

# Layer shapes of the real policies (their config.json), for the body's cost.
SHAPES: dict[str, dict[str, int]] = {
    "qwen2.5-math-1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
    ),
    "qwen2.5-math-7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
    ),
}


def build(shape: str, tmp: Path) -> tuple:
    """(model, tokenizer): a tiny preset via `build_tiny_policy`, or a real shape on the tiny
    tokenizer (random weights, initialised on the device: a 7B takes seconds, never touches disk)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from rstar.data.world import WorldConfig, tokenizer_corpus
    from rstar.models.tiny import SIZES, build_tiny_policy, train_tokenizer

    corpus = tokenizer_corpus(WorldConfig(), n=500)
    if shape in SIZES:
        path = build_tiny_policy(tmp / "model", corpus, size=shape, vocab_size=900)
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tok = train_tokenizer(corpus, vocab_size=900)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **SHAPES[shape],
    )
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    return model, tok


def workload(n_requests: int, n: int, max_new_tokens: int, seed: int = 0) -> list:
    from rstar import steps
    from rstar.data.world import WorldConfig, make_split
    from rstar.models.base import GenRequest

    rng = random.Random(seed)
    problems = make_split("test", {lv: n_requests for lv in (2, 3, 4)}, WorldConfig(), seed=seed)
    reqs = []
    for p in rng.sample(problems, n_requests):
        parts = steps.split_steps(p.meta["solution"])
        k = rng.randint(0, min(3, len(parts) - 1))
        prompt = steps.sft_prompt(p.question) + "".join(parts[:k])
        reqs.append(
            GenRequest(
                prompt, n=n, max_new_tokens=max_new_tokens, temperature=1.0, stop=steps.STOP_STRINGS, seed=k
            )
        )
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", help="qwen2.5-math-1.5b, qwen2.5-math-7b or a tiny preset")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=256)
    args = ap.parse_args()

    import torch

    from rstar.models.hf import HFPolicy

    results: dict = {"shape": args.shape, "requests": args.requests, "n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, tok = build(args.shape, Path(tmp))
        results["build_seconds"] = round(time.perf_counter() - t0, 1)
        reqs = workload(args.requests, args.n, args.max_new_tokens)
        results["device"] = str(next(model.parameters()).device)
        results["parameters"] = sum(p.numel() for p in model.parameters())
        # Twice round, alternating, and the second round counts: the first pays for kernel
        # selection and the allocator's growth at this batch shape.
        for rep in range(2):
            for share in (True, False):
                policy = HFPolicy(
                    model, tokenizer=tok, max_batch_size=args.max_batch_size, share_prefix=share
                )
                t0 = time.perf_counter()
                out = policy.generate(reqs)
                wall = time.perf_counter() - t0
                key = "shared_prefill" if share else "plain_generate"
                results[key] = {
                    "seconds": round(wall, 2),
                    "tokens": policy.tokens_generated,
                    "tokens_per_s": round(policy.tokens_generated / wall, 1),
                    "steps_per_s": round(sum(len(c) for c in out) / wall, 1),
                    "stopped_by_tag": sum(c.stop_reason == "stop" for cs in out for c in cs),
                }
                print(f"round {rep + 1} {key}: {results[key]}", flush=True)
        if torch.cuda.is_available():
            results["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    results["shared_vs_plain"] = round(
        results["shared_prefill"]["tokens_per_s"] / results["plain_generate"]["tokens_per_s"], 2
    )
    print(json.dumps(results))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "hf_throughput.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
