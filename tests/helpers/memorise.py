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

import torch


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
