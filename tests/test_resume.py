"""Kill -9 a real `generate` process mid-run, resume it, and find every search exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.killing import run_until_then_kill

SCRIPT = Path(__file__).parent / "helpers" / "generate_scripted.py"


def keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_bytes().split(b"\n")[:-1] if line.strip()]


def test_kill_9_then_resume_loses_nothing_and_repeats_nothing(tmp_path):
    out = tmp_path / "run"
    trees = out / "trees.jsonl"
    n = 12
    run_until_then_kill(
        [sys.executable, str(SCRIPT), str(out), str(n)],
        lambda: trees.exists() and len(keys(trees)) >= 3,
        timeout_s=120,
        poll_s=0.02,
    )
    done_before = keys(trees)
    assert 3 <= len(done_before) < n, "kill -9 should land mid-run"

    subprocess.run([sys.executable, str(SCRIPT), str(out), str(n), "--resume"], check=True, timeout=300)
    after = keys(trees)
    assert sorted(after) == sorted(f"add:{i}#0" for i in range(n))  # every search exactly once
    assert after[: len(done_before)] == done_before  # what was written before the kill is kept
    assert trees.read_bytes().endswith(b"\n")
