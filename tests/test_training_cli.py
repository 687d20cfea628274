"""`rstar train` as a user meets it: the provenance file beside the weights, stdout holding only
the metrics JSON, the warning for a 7B learning rate on a small model, checkpoints and resume,
and `model.device`. A real tiny Qwen2 built from a config, trained for a few steps."""

from __future__ import annotations

import hashlib
import json

import pytest

from rstar.cli import main
from rstar.data.world import make_split, seed_sft_records
from rstar.training import common


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("train_cli")
    (d / "base").symlink_to(tiny_dir)  # the session's tiny policy, read only
    data = d / "sft.jsonl"
    recs = seed_sft_records(make_split("train", {1: 12}))
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def _train(args, capsys):
    code = main(["train", "sft", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_provenance_stdout_and_the_small_model_lr_warning(setup, capsys, monkeypatch):
    monkeypatch.setattr(common, "_warned_lr", set())
    out_dir = setup / "p1"
    small = ["--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "2", "--eval-fraction", "0"]
    code, out, err = _train(
        [str(setup / "sft.jsonl"), "--model", str(setup / "base"), "--out", str(out_dir), *small], capsys
    )
    assert code == 0
    metrics = json.loads(out)  # stdout is the metrics JSON and nothing else
    assert metrics["steps"] == 2 and "'loss'" not in out
    assert err.count("warning: learning rate 7e-06") == 1 and "--lr" in err  # the paper's default
    prov = json.loads((out_dir / "rstar_training.json").read_text())
    assert prov["kind"] == "sft" and prov["base_model"] == str((setup / "base").resolve())
    sha = hashlib.sha256((setup / "sft.jsonl").read_bytes()).hexdigest()
    assert prov["data"] == {"path": str((setup / "sft.jsonl").resolve()), "sha256": sha, "records": 12}
    assert prov["config"]["learning_rate"] == 7e-6 and prov["config"]["batch_size"] == 4
    assert prov["metrics"]["steps"] == 2 and prov["device"] == "cpu"
    assert {"rstar", "torch", "transformers", "trl"} <= set(prov["versions"])

    code, out, err = _train(
        [
            str(setup / "sft.jsonl"),
            "--model",
            str(setup / "base"),
            "--out",
            str(setup / "p2"),
            "--lr",
            "1e-3",
            "--json",
            *small,
        ],
        capsys,
    )
    assert code == 0 and "warning" not in err and len(out.strip().splitlines()) == 1  # --json: one line
    assert json.loads(out)["steps"] == 2


def test_checkpoints_resume_and_device(setup, capsys):
    out_dir = setup / "p3"
    base = [str(setup / "sft.jsonl"), "--model", str(setup / "base"), "--out", str(out_dir), "--lr", "1e-3"]
    small = [
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--eval-fraction",
        "0",
        "--set",
        "model.device=cpu",
    ]
    code, out, _ = _train([*base, *small, "--max-steps", "2", "--save-steps", "1"], capsys)
    assert code == 0 and (out_dir / "checkpoint-2").is_dir()
    # the second run starts at the last checkpoint (step 2) and goes on to step 3
    code, out, _ = _train([*base, *small, "--max-steps", "3", "--resume-from-checkpoint"], capsys)
    assert code == 0 and json.loads(out)["steps"] == 3
    prov = json.loads((out_dir / "rstar_training.json").read_text())
    assert prov["resumed_from_checkpoint"] == "True" and prov["device"] == "cpu"

    code, _, err = _train([*base, *small, "--max-steps", "1", "--set", "model.device=tpu"], capsys)
    assert code == 2 and "model.device='tpu'" in err


def test_pretrain_keeps_only_a_policy_of_the_same_recipe(tmp_path, capsys):
    """`pretrain_tiny` (`rstar model tiny --pretrain`, `rstar evolve`'s base) keeps a directory
    pre-trained with the same recipe, settings and seed records, and trains again when any of
    them differs: the docs tour relies on it to take the quick run's base as its own."""
    import dataclasses

    from rstar.config import load_config
    from rstar.models.tiny import pretrain_tiny

    cfg = load_config("quick")
    cfg = dataclasses.replace(
        cfg,
        pretrain=dataclasses.replace(cfg.pretrain, batch_size=4, micro_batch_size=4, eval_fraction=0.0),
        evolve=dataclasses.replace(cfg.evolve, vocab_size=400),
    )
    recs = seed_sft_records(make_split("train", {1: 6}))
    out = tmp_path / "tiny"

    def weights() -> str:
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    def kept() -> bool:
        return "already pre-trained with these settings; kept" in capsys.readouterr().err

    pretrain_tiny(out, cfg, records=recs, max_steps=2)
    first = weights()
    assert not kept()
    pretrain_tiny(out, cfg, records=recs, max_steps=2)
    assert kept() and weights() == first
    pretrain_tiny(out, cfg, records=recs[:-1], max_steps=2)  # other seed records
    assert not kept() and weights() != first
    second = weights()
    other_lr = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, learning_rate=1e-4))
    pretrain_tiny(out, other_lr, records=recs[:-1], max_steps=2)  # other settings
    assert not kept() and weights() != second
