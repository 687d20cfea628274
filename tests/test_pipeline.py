"""The whole data loop on a real tiny HF model, through the CLI, on CPU:
generate -> extract sft/ppm -> train sft -> train ppm -> generate again with the new policy
and PPM (PPM-augmented MCTS)."""

from __future__ import annotations

import json

import pytest

from rstar.cli import main
from rstar.data.world import WorldConfig, make_split
from rstar.search.tree import Tree
from rstar.search.treefile import iter_records

# A few small optimizer steps: `rstar train` flags shared by the SFT and PPM runs below.
SMALL_RUN = ["--max-steps", "4", "--batch-size", "4", "--micro-batch-size", "4", "--lr", "1e-3"]

# slow: its first policy is the session's pre-trained one (conftest.py `pretrained_tiny`)
pytestmark = [pytest.mark.usefixtures("torch_one_thread"), pytest.mark.slow]


def test_generate_extract_train_generate_again(tmp_path, pretrained_tiny):
    # The session's pre-trained policy (conftest.py: the quick run's base, pre-trained on the
    # world's level 1-2 seed solutions) solves some level-1 problems and fails others: sampling
    # then produces both right and wrong steps, which is what preference pairs need.
    problems = make_split("train", {1: 8}, WorldConfig(), seed=3)
    pfile = tmp_path / "problems.jsonl"
    pfile.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in problems))
    policy0 = pretrained_tiny

    search = [
        "--set",
        "search.num_samples=4",
        "--set",
        "search.max_new_tokens=64",
        "--set",
        "search.temperature=1.0",
        "--set",
        "search.top_p=1.0",
        "--set",
        "model.cpu_threads=1",
    ]
    gen1 = tmp_path / "round2"
    assert (
        main(
            [
                "generate",
                "--problems",
                str(pfile),
                "--policy",
                str(policy0),
                "--preset",
                "round2",
                "--set",
                "search.rollouts=6",
                *search,
                "--out",
                str(gen1),
            ]
        )
        == 0
    )
    recs = list(iter_records(gen1 / "trees.jsonl"))
    assert len(recs) == len(problems) and all(r["config"]["search"]["rollouts"] == 6 for r in recs)
    assert any(r["correct"] for r in recs), "the pre-trained policy should solve some problem"

    assert main(["extract", "sft", str(gen1), "--out", str(tmp_path / "sft.jsonl")]) == 0
    assert (
        main(
            [
                "extract",
                "ppm",
                str(gen1),
                "--out",
                str(tmp_path / "pairs.jsonl"),
                "--min-margin",
                "0",
                "--min-edit-distance",
                "0",
            ]
        )
        == 0
    )
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert sft and all(r["response"].startswith("<code>") for r in sft)
    assert pairs and all(set(r) == {"prompt", "pos", "neg", "pos_count", "neg_count"} for r in pairs)

    assert (
        main(
            [
                "train",
                "sft",
                str(tmp_path / "sft.jsonl"),
                "--model",
                str(policy0),
                "--out",
                str(tmp_path / "policy1"),
                *SMALL_RUN,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "ppm",
                str(tmp_path / "pairs.jsonl"),
                "--model",
                str(tmp_path / "policy1"),
                "--out",
                str(tmp_path / "ppm1"),
                *SMALL_RUN,
            ]
        )
        == 0
    )
    assert (tmp_path / "ppm1" / "metrics.json").exists()

    gen2 = tmp_path / "round3"
    assert (
        main(
            [
                "generate",
                "--problems",
                str(pfile),
                "--policy",
                str(tmp_path / "policy1"),
                "--ppm",
                str(tmp_path / "ppm1"),
                "--preset",
                "round3",
                "--set",
                "search.rollouts=3",
                *search,
                "--out",
                str(gen2),
            ]
        )
        == 0
    )
    recs = list(iter_records(gen2 / "trees.jsonl"))
    assert len(recs) == len(problems)
    values, steps = set(), 0
    for rec in recs:
        assert rec["config"]["search"]["ppm_init"] is True
        tree = Tree.from_dict(rec["tree"])
        scored = tree.nodes[1:]
        assert scored and all(n.value is not None for n in scored)
        values |= {round(n.value, 6) for n in scored}
        # PPM-initialised q: every open step starts from its PPM value as one visit, then
        # gains the +1/-1 of each answer backed up through it (terminal-guided, round 3).
        for n in scored:
            if n.is_terminal:
                continue
            below = [a for a in tree.answers() if n in tree.path(a)]
            assert n.N == 1 + len(below)
            assert n.q == pytest.approx(n.value + sum(a.q for a in below))
            steps += 1
    assert steps  # some open step was checked
    assert len(values) > 1  # the PPM scores each step's own text, not one constant

    # evaluation with the new models: every mode, two budgets, from one run per mode
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--benchmark",
                str(pfile),
                "--policy",
                str(tmp_path / "policy1"),
                "--ppm",
                str(tmp_path / "ppm1"),
                "--mode",
                "greedy,bon,mcts",
                "--trajectories",
                "1,2",
                "--top-k",
                "2",
                "--ablation",
                f"again={tmp_path / 'ppm1'}",
                "--out",
                str(out),
                *search,
                "--set",
                "search.rollouts=2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"greedy", "bon-ppm", "mcts-ppm", "mcts-again"}
    assert set(summary["runs"]["bon-ppm"]["metrics"]) == {"1", "2"}
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(problems) * 4 and all("trajectories" in r and "selected" in r for r in rows)
    for r in rows:  # the chosen answer of every rule at every budget the run reports
        budgets = ["1"] if r["run"] == "greedy" else ["1", "2"]
        assert sorted(r["by_budget"]) == budgets
        for b in budgets:
            chosen = r["by_budget"][b]["answers"]
            answers = {t["answer"] for t in r["trajectories"]}
            assert all(a is None or a in answers for a in chosen.values())
            assert r["by_budget"][b]["correct"]["pass"] == any(
                t["correct"] for t in r["trajectories"] if t["order"] < int(b)
            )
    table = (out / "summary.md").read_text()
    assert "| bon-ppm | bon | ppm1 | 1 |" in table and "| bon-ppm | bon | ppm1 | 2 |" in table
    assert (out / "scaling.png").stat().st_size > 5000 and "| mcts-ppm | mcts |" in (
        out / "summary.md"
    ).read_text()
