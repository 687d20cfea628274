"""How well three reward signals rank held-out preference pairs (docs/EXPERIMENTS.md, E10).

On a pairs file in the authors' format (`rstar extract ppm|orm`), split by problem exactly as
`rstar train ppm --eval-fraction F` splits it (`training.common.split_held_out`, the ppm
config's seed), this prints the share of held-out pairs whose `pos` scores above its `neg`:

- `logprob`: the policy's own log-probability of each completion (summed and per token);
- `implicit`: the implicit reward (`rstar train ppm --kind implicit`: the policy trained with
  DPO on the training pairs, scored by beta * the summed log(pi / pi_ref) over the response,
  pi_ref the policy), its held-out accuracy as training reports it;
- with `--ppm DIR`, that trained reward model's score (`rstar train ppm`'s model).

With `--trees FILE ...` (best-of-N tree files of `rstar eval --mode bon`, e.g. RUN/eval/bon-ppm),
it also picks one answer per tree by the implicit reward of each whole solution and prints how
many picks are correct, beside the majority vote of the same solutions and pass@N.

    python bench/implicit_reward.py PAIRS.jsonl --policy POLICY [--ppm PPM] [--work DIR]
        [--beta 0.1] [--lr 1e-4] [--epochs 2] [--eval-fraction 0.2] [--trees FILE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def pairwise(held: list[dict], score) -> float:
    return sum(score(r["prompt"], r["pos"]) > score(r["prompt"], r["neg"]) for r in held) / len(held)


def response_logprobs(model, tok, text: str):
    """(T,) the policy's log-probabilities of the response tokens of `text` (the implicit
    reward's split of prompt and response, `models.ppm.split_ids`)."""
    import torch

    from rstar.models.ppm import split_ids

    ids, first = split_ids(tok, text, 1 << 30)
    x = torch.tensor([ids])
    with torch.inference_mode():
        logp = model(x).logits[0, :-1].log_softmax(-1)
    return logp.gather(1, x[0, 1:, None])[:, 0][max(0, first - 1) :]


def best_of_n(path: str, reward) -> dict:
    """Per tree of a best-of-N tree file: is the answer with the highest `reward(text)` correct,
    is the majority answer, is any."""
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
        pick = max(paths, key=lambda t: reward("".join(whole(question, t.text))))
        top = Counter(answers[t.node_id] for t in paths).most_common(1)[0][0]
        out["reward_pick"] += bool(pick.correct)
        out["majority"] += any(t.correct for t in paths if answers[t.node_id] == top)
        out["pass"] += any(t.correct for t in paths)
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="pairs file (authors' format: prompt, pos, neg)")
    ap.add_argument("--policy", required=True, help="the policy the pairs were sampled from (and pi_ref)")
    ap.add_argument("--ppm", help="also score with this trained reward model (rstar train ppm)")
    ap.add_argument("--work", default="runs/implicit_reward", help="where the implicit reward is written")
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
    from rstar.models.ppm import ImplicitRewardModel, load_reward_model
    from rstar.training.common import problem_key, split_held_out
    from rstar.training.reward import train_reward

    torch.set_num_threads(args.threads)
    recs = [json.loads(x) for x in Path(args.pairs).read_text().splitlines() if x.strip()]
    cfg = dataclasses.replace(
        load_config("embedded").ppm,
        learning_rate=args.lr,
        epochs=args.epochs,
        beta=args.beta,
        eval_fraction=args.eval_fraction,
    )
    train, held = split_held_out(recs, cfg.eval_fraction, cfg.seed, key=lambda r: problem_key(r["prompt"]))
    print(f"pairs={len(recs)} train={len(train)} held_out={len(held)}", flush=True)

    tok = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy).eval()
    # each completion's log-probabilities once, read as a sum and as a per-token mean
    logprobs = {
        p + c: response_logprobs(policy, tok, p + c)
        for r in held
        for p, c in ((r["prompt"], r["pos"]), (r["prompt"], r["neg"]))
    }
    lp_sum = pairwise(held, lambda p, c: float(logprobs[p + c].sum()))
    lp_mean = pairwise(held, lambda p, c: float(logprobs[p + c].mean()))
    print(f"logprob held_out_accuracy sum={lp_sum:.3f} per_token={lp_mean:.3f}", flush=True)

    out = Path(args.work) / "implicit"
    metrics = train_reward(recs, args.policy, out, cfg, kind="implicit", device="cpu")
    print(
        f"implicit held_out_accuracy={metrics['heldout_accuracy']:.3f} (beta={args.beta} lr={args.lr} "
        f"epochs={args.epochs}, trained in {metrics['train_seconds']:.0f} s)",
        flush=True,
    )
    implicit = ImplicitRewardModel(out, device="cpu")
    for path in args.trees:
        result = best_of_n(path, lambda text: implicit.log_ratios([text])[0])
        print(f"best_of_n {path}: {json.dumps(result)}", flush=True)
    if args.ppm:
        scorer = load_reward_model(args.ppm)
        acc = pairwise(held, lambda p, c: scorer.score([p], [c])[0])
        print(f"ppm held_out_accuracy={acc:.3f} ({args.ppm})", flush=True)


if __name__ == "__main__":
    main()
