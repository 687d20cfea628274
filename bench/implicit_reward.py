"""How well three reward signals rank held-out preference pairs (docs/EXPERIMENTS.md, E10).

On a pairs file in the authors' format (`rstar extract ppm|orm`), split by problem exactly as
`rstar train ppm --eval-fraction F` splits it (`training.common.split_held_out`, the ppm
config's seed), this prints the share of held-out pairs whose `pos` scores above its `neg`:

- `logprob`: the policy's own log-probability of each completion (summed and per token);
- `implicit`: an implicit process reward (Yuan et al., "Free Process Rewards without Process
  Labels", 2024): the policy trained with DPO (TRL's `DPOTrainer`) on the training pairs, and
  each completion scored by beta * sum of log(pi / pi_ref) over its tokens, pi_ref the policy;
- with `--ppm DIR`, that trained value-head reward model's score (`rstar train ppm`'s model).

With `--trees FILE ...` (best-of-N tree files of `rstar eval --mode bon`, e.g. RUN/eval/bon-ppm),
it also picks one answer per tree by the implicit reward of each whole solution and prints how
many picks are correct, beside the majority vote of the same solutions and pass@N.

    python bench/implicit_reward.py PAIRS.jsonl --policy POLICY [--ppm PPM] [--work DIR]
        [--beta 0.1] [--lr 1e-4] [--epochs 2] [--eval-fraction 0.2] [--trees FILE ...]

Why a bench script and not a reward-model kind: the project's reward models are value heads
(PPM, ORM, PQM, the paper's); this measures whether the implicit reward is worth adding as one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def completion_logprobs(model, tok, prompt: str, completion: str):
    """(T,) log-probabilities of the completion's tokens after the prompt (one sequence)."""
    import torch

    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    k = len(p)  # tokens shared with the prompt's own encoding (a merge can straddle the seam)
    while k > 0 and full[:k] != p[:k]:
        k -= 1
    ids = torch.tensor([full])
    with torch.inference_mode():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0][max(0, k - 1) :]


def pairwise(held: list[dict], score) -> float:
    return sum(score(r["prompt"], r["pos"]) > score(r["prompt"], r["neg"]) for r in held) / len(held)


def best_of_n(path: str, reward) -> dict:
    """Per tree of a best-of-N tree file: is the answer with the highest `reward(prompt,
    completion)` correct, is the majority answer, is any."""
    from collections import Counter

    from rstar.data.extract import parse_search, scored_paths, whole
    from rstar.search.treefile import iter_records

    out = Counter()
    for i, rec in enumerate(iter_records(path)):
        search = parse_search(f"{path}:{i + 1}", rec)
        answers = {n.id: n.answer for n in search.tree.nodes}
        paths = scored_paths(search, invalid=False)
        out["problems"] += 1
        if not paths:
            continue
        question = rec["problem"]["question"]
        pick = max(paths, key=lambda t: reward(*whole(question, t.text)))
        top = Counter(answers[t.node_id] for t in paths).most_common(1)[0][0]
        out["reward_pick"] += bool(pick.correct)
        out["majority"] += any(t.correct for t in paths if answers[t.node_id] == top)
        out["pass"] += any(t.correct for t in paths)
    return dict(out)


def train_dpo(train: list[dict], policy: str, out: Path, beta: float, lr: float, epochs: float) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(policy)
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["pos"], "rejected": r["neg"]} for r in train])
    args = DPOConfig(
        output_dir=str(out),
        learning_rate=lr,
        beta=beta,
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        max_length=1024,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy), args=args, train_dataset=ds, processing_class=tok
    )
    trainer.train()
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="pairs file (authors' format: prompt, pos, neg)")
    ap.add_argument("--policy", required=True, help="the policy the pairs were sampled from (and pi_ref)")
    ap.add_argument("--ppm", help="also score with this trained reward model (rstar train ppm)")
    ap.add_argument("--work", default="runs/implicit_reward", help="where the DPO model is written")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--eval-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: see the embedded preset)")
    ap.add_argument("--trees", nargs="*", default=[], help="best-of-N tree files to pick answers from")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rstar.config import load_config
    from rstar.training.common import problem_key, split_held_out

    torch.set_num_threads(args.threads)
    recs = [json.loads(x) for x in Path(args.pairs).read_text().splitlines() if x.strip()]
    seed = load_config().ppm.seed
    train, held = split_held_out(recs, args.eval_fraction, seed, key=lambda r: problem_key(r["prompt"]))
    print(f"pairs={len(recs)} train={len(train)} held_out={len(held)}", flush=True)

    tok = AutoTokenizer.from_pretrained(args.policy)
    ref = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    lp_sum = pairwise(held, lambda p, c: float(completion_logprobs(ref, tok, p, c).sum()))
    lp_mean = pairwise(held, lambda p, c: float(completion_logprobs(ref, tok, p, c).mean()))
    print(f"logprob held_out_accuracy sum={lp_sum:.3f} per_token={lp_mean:.3f}", flush=True)

    out = Path(args.work) / "dpo"
    t0 = time.perf_counter()
    train_dpo(train, args.policy, out, args.beta, args.lr, args.epochs)
    dpo = AutoModelForCausalLM.from_pretrained(out).eval()

    def implicit(p: str, c: str) -> float:
        return float((completion_logprobs(dpo, tok, p, c) - completion_logprobs(ref, tok, p, c)).sum())

    acc = pairwise(held, implicit)
    print(
        f"implicit held_out_accuracy={acc:.3f} (beta={args.beta} lr={args.lr} epochs={args.epochs}, "
        f"trained in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    for path in args.trees:
        print(f"best_of_n {path}: {json.dumps(best_of_n(path, implicit))}", flush=True)
    if args.ppm:
        from rstar.models.ppm import load_reward_model

        scorer = load_reward_model(args.ppm)
        acc = pairwise(held, lambda p, c: scorer.score([p], [c])[0])
        print(f"ppm held_out_accuracy={acc:.3f} ({args.ppm})", flush=True)


if __name__ == "__main__":
    main()
