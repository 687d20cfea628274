"""Issue 21: one writer per output directory, one clear line for every bad input, `--resume`
that checks its settings; each driven through real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SCRIPTED = TESTS / "helpers" / "generate_scripted.py"
PY = sys.executable


def _holder(directory: Path) -> subprocess.Popen:
    """A process that holds DIR's write lock until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from rstar.lock import locked_dir
        with locked_dir({str(directory)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_bytes().split(b"\n")[:-1] if line.strip()]


# --- one writer per output -------------------------------------------------------------------


def test_second_writer_fails_at_once_naming_the_holder_and_kill_9_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [PY, str(SCRIPTED), str(out), "2", "--resume"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode != 0
        assert f"pid {holder.pid}" in proc.stderr
        assert time.monotonic() - t0 < 60  # at once: no search ran
        assert not (out / "trees.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock died with its process: the next writer gets it
    subprocess.run([PY, str(SCRIPTED), str(out), "2", "--resume"], check=True, timeout=300)
    assert sorted(_keys(out / "trees.jsonl")) == ["add:0#0", "add:1#0"]


def test_a_running_generate_keeps_a_second_one_out(tmp_path):
    out = tmp_path / "run"
    trees = out / "trees.jsonl"
    n = 60
    first = subprocess.Popen([PY, str(SCRIPTED), str(out), str(n)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (trees.exists() and trees.stat().st_size):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # a fresh run and a resume started while the first writes: both refused
        for extra in ([], ["--resume"]):
            second = subprocess.run(
                [PY, str(SCRIPTED), str(out), str(n), *extra], capture_output=True, text=True, timeout=120
            )
            assert first.poll() is None, "the first run ended too soon for this test"
            assert second.returncode != 0
            assert f"pid {first.pid}" in second.stderr
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    keys = _keys(trees)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == n


def test_two_fresh_runs_started_together_do_not_both_write(tmp_path):
    out = tmp_path / "run"
    procs = [
        subprocess.Popen([PY, str(SCRIPTED), str(out), "4"], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, codes
    keys = _keys(out / "trees.jsonl")
    assert sorted(keys) == [f"add:{i}#0" for i in range(4)]


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    from rstar.lock import locked_dir

    with locked_dir(tmp_path / "d"), locked_dir(tmp_path / "d"):
        pass
    with locked_dir(tmp_path / "d"):  # released: taken again
        pass
    assert os.path.isdir(tmp_path / "d")
