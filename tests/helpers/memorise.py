"""Train a tiny causal LM until it has memorised a text, checked by what the tests need.

Tests and benchmarks use a tiny policy that has memorised one short step-format solution, so
that greedy continuations are known. A fixed number of optimiser steps reaches different losses
on different CPUs (their kernels round differently), so training runs until greedy decoding
reproduces every expected continuation, checked every few steps, with a cap and a clear failure
past it; then a few more steps widen the margin so that other engines (llama.cpp's f32 kernels,
vLLM's) decode the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rstar import steps

# --- the texts the tiny models memorise ---------------------------------------------------------

# One step, repeated: after any `<end_of_step>` the trained model must go on with REPEAT_STEP,
# not stop at once (tests/test_models_hf.py, tests/test_engine.py).
REPEAT_STEP = "\n\n# add one\nx = x + 1\n<end_of_step>"
REPEAT_HEADER = steps.sft_prompt("Count up.") + "<code>\n# start\nx = 0\n<end_of_step>"
REPEAT_TEXT = REPEAT_HEADER + REPEAT_STEP * 4
REPEAT_CASES = [(REPEAT_HEADER + REPEAT_STEP * k, REPEAT_STEP) for k in range(4)]

# A solution with every kind of step, each different so that a tiny model can memorise it
# (tests/test_models_http.py, bench/vllm_check.py).
HEADER = steps.sft_prompt("Count up.") + "<code>\n# start at zero\nx = 0\n<end_of_step>"
STEP2 = "\n\n# add one\nx = x + 1\n<end_of_step>"
STEP3 = "\n\n# double it\nx = x * 2\n<end_of_step>"
FINAL = "\n\n# Now print the final answer\nprint(x)\n<end_of_code>"
OUTPUT = "\n<output>2<end_of_output>"
ANSWER = "\n<answer>The count is \\boxed{2}<end_of_answer>"
SOLUTION_TEXT = HEADER + STEP2 + STEP3 + FINAL + OUTPUT + ANSWER
# (prompt, the greedy continuation up to and including its stop tag)
SOLUTION_CASES = [
    (HEADER, STEP2),
    (HEADER + STEP2, STEP3),
    (HEADER + STEP2 + STEP3, FINAL),
    (HEADER + STEP2 + STEP3 + FINAL + OUTPUT, ANSWER),
]


def greedy_matches(model, tok, cases: Sequence[tuple[str, str]]) -> list[bool]:
    """For each (prompt, continuation): does greedy decoding of prompt start with continuation?"""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt, want in cases:
            ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)  # (1, T)
            n_new = len(tok(want, add_special_tokens=False)["input_ids"]) + 2
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=False)
            out.append(text.startswith(want))
    model.train(was_training)
    return out


def memorise(
    model,
    tok,
    text: str,
    cases: Sequence[tuple[str, str]],
    *,
    lr: float = 5e-3,
    check_every: int = 10,
    extra_steps: int = 20,
    max_steps: int = 1000,
    seed: int = 0,
) -> int:
    """Train `model` on `text` (AdamW, full batch) until greedy decoding reproduces every
    continuation of `cases`, then `extra_steps` more; return the steps taken. Raises
    AssertionError naming the cases still wrong when `max_steps` pass without success."""
    device = next(model.parameters()).device
    ids = tok(text, return_tensors="pt")["input_ids"].to(device)  # (1, T)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        model.train()
        steps, loss, margin = 0, float("nan"), False
        while True:
            n = extra_steps if margin else check_every
            for _ in range(n):
                loss = step()
            steps += n
            ok = greedy_matches(model, tok, cases)
            if all(ok) and margin:
                break
            margin = all(ok)  # reproduced: train `extra_steps` more, then check once again
            if steps >= max_steps:
                wrong = [prompt[-40:] for (prompt, _), good in zip(cases, ok) if not good]
                raise AssertionError(
                    f"memorisation failed: after {steps} steps (loss {loss:.4f}) greedy decoding still "
                    f"misses {len(wrong)} of {len(cases)} continuations, e.g. after {wrong[0] if wrong else ''!r}"
                )
    model.eval()
    return steps


def memorised_model(
    path: str | Path,
    text: str = SOLUTION_TEXT,
    cases: Sequence[tuple[str, str]] = SOLUTION_CASES,
    *,
    device: str = "cpu",
    seed: int = 0,
):
    """(model, tokenizer): the HF model directory at `path` loaded on `device` and trained to
    memorise `text` (`memorise`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    memorise(model, tok, text, cases, seed=seed)
    return model, tok


def memorised_policy(
    out: str | Path,
    text: str = SOLUTION_TEXT,
    cases: Sequence[tuple[str, str]] = SOLUTION_CASES,
    *,
    size: str = "tiny",
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """A tiny policy (`rstar.models.tiny`, preset `size`) that has memorised `text`, trained
    on `device` and saved as an HF directory at `out`; returns its path."""
    from rstar.models.tiny import build_tiny_policy

    path = build_tiny_policy(out, size=size, seed=seed)
    model, _ = memorised_model(path, text, cases, device=device, seed=seed)
    model.cpu().save_pretrained(path)
    return Path(path)
