"""Check `rstar.models.vllm.VLLMPolicy` on a GPU machine, and compare it with `HFPolicy`.

Needs a CUDA GPU and vLLM (docs/GPU.md); needs no network: the model is built here, a
tiny Qwen2 from `rstar.models.tiny` ("small" preset, ~5M parameters) trained for a few
seconds to memorise one short solution (tests/helpers/memorise.py), so that its greedy steps, and their stop tags, are
known in advance. It checks, and prints figures for:

1. greedy steps: each prompt's continuation is the memorised next step, ending with its
   own tag (`<end_of_step>`, `<end_of_code>`, `<end_of_answer>`), identical for n = 2 and
   identical to the HF backend's;
2. a search-like workload (`--requests` prompts x n = `--n` samples, temperature 1, the
   three stop strings, a seed per request): every "stop" completion ends with one tag and
   holds no earlier one, every "length" one has `max_new_tokens` tokens; tokens/s;
3. seeds: the workload again gives the same texts; a few requests alone, twice, give the
   same texts; sample i of a seeded n-request equals the request alone with seed + i;
4. HFPolicy on the same GPU, same requests (`--hf-requests` of them): tokens/s, and the
   same greedy steps.

    python bench/vllm_check.py [--requests 256] [--n 8] [--max-new-tokens 64] [--eager]

Prints one line per check and, last, a JSON summary (also written to $OUT/vllm_check.json
when OUT is set). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rstar import steps
from rstar.models.base import Completion, GenRequest
from rstar.models.hf import first_stop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# The memorised solution and its greedy steps, shared with the tests.
from helpers.memorise import SOLUTION_CASES as CASES  # noqa: E402
from helpers.memorise import STEP2, memorised_policy  # noqa: E402

STOPS = steps.STOP_STRINGS

failures: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)
    return ok


def workload(n_requests: int, n: int, max_new: int) -> list[GenRequest]:
    """Search-like prompts: the memorised solution cut at each step, and other questions
    with a step or two of it (which the model has not seen: longer, freer steps)."""
    rng = random.Random(0)
    prompts = [p for p, _ in CASES]
    for k in range(n_requests):
        q = f"Alice has {rng.randint(2, 99)} boxes with {rng.randint(2, 30)} coins each. How many coins? ({k})"
        prompts.append(
            steps.sft_prompt(q) + "<code>\n# start at zero\nx = 0\n<end_of_step>" + STEP2 * (k % 3)
        )
    prompts = [prompts[i % len(prompts)] for i in range(n_requests)]
    return [
        GenRequest(p, n=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, stop=STOPS, seed=1000 * i)
        for i, p in enumerate(prompts)
    ]


def greedy_check(name: str, policy: object) -> list[list[Completion]]:
    reqs = [GenRequest(p, n=2, max_new_tokens=48, temperature=0.0, stop=STOPS) for p, _ in CASES]
    out = policy.generate(reqs)  # type: ignore[attr-defined]
    for (_, want), cs in zip(CASES, out):
        check(
            [(c.text, c.stop_reason) for c in cs] == [(want, "stop")] * 2,
            f"{name} greedy step ending {want.strip()[-16:]!r}: got {[c.text[-24:] for c in cs]}",
        )
    return out


def endings_ok(reqs: list[GenRequest], out: list[list[Completion]]) -> tuple[bool, Counter]:
    reasons: Counter = Counter()
    ok = True
    for r, cs in zip(reqs, out):
        ok &= len(cs) == r.n
        for c in cs:
            reasons[c.stop_reason] += 1
            if c.stop_reason == "stop":
                cut = first_stop(c.text, r.stop)
                ok &= cut == len(c.text) and any(c.text.endswith(s) for s in r.stop)
                reasons[steps.parse_step(c.text).kind] += 1
            elif c.stop_reason == "length":
                ok &= c.n_tokens == r.max_new_tokens and first_stop(c.text, r.stop) is None
    return ok, reasons


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=64, help="workload prefix run on HFPolicy")
    ap.add_argument("--hf-batch", type=int, default=256, help="HFPolicy max_batch_size")
    ap.add_argument("--size", default="small", help="tiny-policy preset (tiny, small, medium)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (faster start, slower decode)")
    ap.add_argument("--work", default=None, help="directory for the model (default: a temporary one)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this check runs on a GPU machine (docs/GPU.md)", file=sys.stderr)
        return 2
    import vllm

    summary: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "size": args.size,
        "dtype": args.dtype,
    }
    work = Path(args.work or tempfile.mkdtemp(prefix="vllm_check_"))
    # On the GPU until greedy decoding reproduces every step (a few seconds).
    model_dir = memorised_policy(work / "policy", size=args.size, device="cuda")

    from rstar.models.vllm import VLLMPolicy

    t0 = time.perf_counter()
    policy = VLLMPolicy(
        model_dir,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=2048,
        enforce_eager=args.eager,
    )
    summary["vllm_start_s"] = round(time.perf_counter() - t0, 1)
    print(f"vLLM engine up in {summary['vllm_start_s']} s", flush=True)

    # 1. greedy steps and their tags
    vllm_greedy = greedy_check("vLLM", policy)

    # 2. the workload
    reqs = workload(args.requests, args.n, args.max_new_tokens)
    policy.generate(reqs[:8])  # warm-up
    policy.reset_counters()
    t0 = time.perf_counter()
    out = policy.generate(reqs)
    dt = time.perf_counter() - t0
    ok, reasons = endings_ok(reqs, out)
    check(ok, f"vLLM workload: {len(reqs)} requests x n={args.n}, endings {dict(reasons)}")
    summary["vllm_tokens"] = policy.tokens_generated
    summary["vllm_seconds"] = round(dt, 3)
    summary["vllm_tok_per_s"] = round(policy.tokens_generated / dt)
    summary["stop_reasons"] = dict(reasons)
    print(
        f"vLLM: {policy.tokens_generated} tokens in {dt:.2f} s = {summary['vllm_tok_per_s']} tok/s",
        flush=True,
    )

    # 3. seeds
    again = policy.generate(reqs)
    same = sum(a.text == b.text for x, y in zip(out, again) for a, b in zip(x, y))
    total = sum(len(x) for x in out)
    summary["rerun_same_fraction"] = round(same / total, 4)
    check(same / total >= 0.99, f"vLLM seeded workload rerun: {same}/{total} samples identical")
    few = reqs[:4]
    alone = [[policy.generate([r])[0] for r in few] for _ in range(2)]
    check(
        [[c.text for c in cs] for cs in alone[0]] == [[c.text for c in cs] for cs in alone[1]],
        "vLLM seeded requests alone, twice: identical",
    )
    r = reqs[1]
    singles = policy.generate(
        [
            GenRequest(r.prompt, 1, r.max_new_tokens, r.temperature, r.top_p, r.stop, r.seed + i)
            for i in range(r.n)
        ]
    )
    check(
        [cs[0].text for cs in singles] == [c.text for c in alone[0][1]],
        "vLLM sample i of a seeded n-request == the request alone with seed + i",
    )
    distinct = sum(len({c.text for c in cs}) for cs in out) / len(out)
    summary["distinct_samples_per_request"] = round(distinct, 2)
    check(
        distinct > 1, f"vLLM n={args.n} samples differ within a request ({distinct:.2f} distinct on average)"
    )
    del policy
    import gc

    gc.collect()
    torch.cuda.empty_cache()

    # 4. HF on the same GPU
    from rstar.models.hf import HFPolicy

    hf = HFPolicy(model_dir, device="cuda", dtype=args.dtype, max_batch_size=args.hf_batch)
    hf_greedy = greedy_check("HF", hf)
    check(
        [[c.text for c in cs] for cs in hf_greedy] == [[c.text for c in cs] for cs in vllm_greedy],
        "HF and vLLM greedy steps identical",
    )
    sub = reqs[: args.hf_requests]
    hf.generate(sub[:8])  # warm-up
    hf.reset_counters()
    t0 = time.perf_counter()
    hf_out = hf.generate(sub)
    hf_dt = time.perf_counter() - t0
    ok, hf_reasons = endings_ok(sub, hf_out)
    check(ok, f"HF workload: {len(sub)} requests x n={args.n}, endings {dict(hf_reasons)}")
    summary["hf_requests"] = len(sub)
    summary["hf_tokens"] = hf.tokens_generated
    summary["hf_seconds"] = round(hf_dt, 3)
    summary["hf_tok_per_s"] = round(hf.tokens_generated / hf_dt)
    summary["vllm_over_hf"] = round(summary["vllm_tok_per_s"] / max(1, summary["hf_tok_per_s"]), 2)  # type: ignore[operator]
    print(f"HF: {hf.tokens_generated} tokens in {hf_dt:.2f} s = {summary['hf_tok_per_s']} tok/s", flush=True)

    summary["failures"] = failures
    line = json.dumps(summary)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vllm_check.json").write_text(line + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
