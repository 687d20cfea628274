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

import pytest

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


# --- one line for every bad input ------------------------------------------------------------


def _tree_record(key: str = "k", **over) -> dict:
    nodes = [
        {"id": 0, "parent": None, "depth": 0, "text": "", "children": [1], "N": 1, "q": 0.0},
        {"id": 1, "parent": 0, "depth": 1, "text": "step", "children": [], "N": 1, "q": 0.0},
    ]
    rec = {
        "key": key,
        "problem": {"id": "p", "question": "1+1?", "answer": "2"},
        "mode": "mcts",
        "tree": {"question": "1+1?", "prompt": "", "nodes": nodes},
    }
    rec.update(over)
    return rec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    (d / "p.json").write_text(json.dumps([{"id": "a", "question": "1+1?", "answer": "2"}]))
    (d / "empty.json").write_text("[]")
    (d / "empty.jsonl").write_text("")
    (d / "file.json").write_text('{"a": 1}')
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")  # passes the directory check, never loaded
    (d / "binary.py").write_bytes(b"\x7fELF\x00\x01\x02")
    (d / "latin1.py").write_bytes(b"print('caf\xe9')")
    (d / "ok.py").write_text("print(1)\n")
    (d / "garbage.jsonl").write_bytes(b"this is not a tree")
    (d / "problem_str.jsonl").write_text(json.dumps(_tree_record(problem="what is 1+1?")) + "\n")
    missing = _tree_record()
    missing["tree"]["nodes"][0]["children"] = [1, 5]
    (d / "missing_child.jsonl").write_text(json.dumps(missing) + "\n")
    cycle = _tree_record()
    cycle["tree"]["nodes"].append(
        {"id": 2, "parent": 3, "depth": 2, "text": "a", "children": [3], "N": 1, "q": 0}
    )
    cycle["tree"]["nodes"].append(
        {"id": 3, "parent": 2, "depth": 2, "text": "b", "children": [2], "N": 1, "q": 0}
    )
    (d / "cycle.jsonl").write_text(json.dumps(cycle) + "\n")
    (d / "evolve").mkdir()
    (d / "evolve" / "state.json").write_text('{"stages": {"problems": ')
    return d


GEN = ["generate", "--problems", "{d}/p.json", "--out", "{out}"]
# (case, arguments ({d}: the inputs, {out}: a fresh path), what the error line must say)
BAD_INPUTS = [
    ("policy-missing", [*GEN, "--policy", "/nonexistent"], "--policy /nonexistent: no such model directory"),
    ("policy-file", [*GEN, "--policy", "{d}/file.json"], "a file, expected a model directory"),
    ("policy-typo", [*GEN, "--policy", "./tinyy"], "--policy ./tinyy: no such model directory"),
    ("policy-offline", [*GEN, "--policy", "nosuch/model"], "not in the Hugging Face cache"),
    ("config-missing", [*GEN, "--policy", "{d}/model", "--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    ("out-is-file", ["generate", "--problems", "{d}/p.json", "--out", "{d}/file.json"], "not a directory"),
    ("out-unwritable", ["generate", "--problems", "{d}/p.json", "--out", "{d}/file.json/sub"], "--out"),
    ("limit-negative", [*GEN, "--limit", "-1"], "argument --limit"),
    ("problems-empty", ["generate", "--problems", "{d}/empty.json", "--out", "{out}"], "no problems"),
    ("problems-empty-jsonl", ["generate", "--problems", "{d}/empty.jsonl", "--out", "{out}"], "no problems"),
    ("cuda-on-cpu", [*GEN, "--policy", "{d}/model", "--set", "model.device=cuda"], "model.device=cuda"),
    ("ray-no-cluster", [*GEN, "--policy", "{d}/model", "--ray", "auto"], "no running Ray cluster"),
    (
        "eval-policy",
        ["eval", "--benchmark", "{d}/p.json", "--policy", "/nonexistent", "--out", "{out}"],
        "--policy",
    ),
    (
        "eval-empty",
        ["eval", "--benchmark", "{d}/empty.json", "--policy", "{d}/model", "--out", "{out}"],
        "no problems",
    ),
    ("exec-missing", ["exec", "{d}/nope.py"], "no such file"),
    ("exec-binary", ["exec", "{d}/binary.py"], "a binary file"),
    ("exec-not-utf8", ["exec", "{d}/latin1.py"], "not UTF-8"),
    ("exec-timeout-0", ["exec", "{d}/ok.py", "--timeout", "0"], "argument --timeout"),
    ("exec-timeout-nan", ["exec", "{d}/ok.py", "--timeout", "nan"], "argument --timeout"),
    ("exec-timeout-huge", ["exec", "{d}/ok.py", "--timeout", "1e12"], "argument --timeout"),
    ("exec-memory-0", ["exec", "{d}/ok.py", "--memory-mb", "0"], "argument --memory-mb"),
    ("grade-timeout-0", ["grade", "1", "1", "--timeout", "0"], "argument --timeout"),
    ("view-problem-str", ["view", "{d}/problem_str.jsonl", "--out", "{out}.html"], "problem.id"),
    ("view-missing-child", ["view", "{d}/missing_child.jsonl", "--out", "{out}.html"], "child 5"),
    ("view-cycle", ["view", "{d}/cycle.jsonl", "--out", "{out}.html"], "not an earlier node"),
    ("extract-garbage", ["extract", "sft", "{d}/garbage.jsonl", "--out", "{out}.jsonl"], "no tree records"),
    ("evolve-corrupt-state", ["evolve", "--run-dir", "{d}/evolve"], "state.json: corrupt"),
    ("solve-no-gold", ["solve", "1+1?", "--preset", "embedded", "--policy", "{d}/model"], "pass --answer"),
    ("sandbox-set-nan", [*GEN, "--policy", "{d}/model", "--set", "sandbox.timeout_s=nan"], "timeout_s"),
]


@pytest.mark.parametrize("case,argv,says", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_leaves_nothing(case, argv, says, inputs, tmp_path):
    out = tmp_path / "out"
    args = [a.format(d=inputs, out=out) for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "rstar.cli", *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rstar ") and "error" in last, proc.stderr
    assert says in last, last
    assert time.monotonic() - t0 < 60
    assert not out.exists() and not Path(f"{out}.html").exists() and not Path(f"{out}.jsonl").exists()


# --- --resume checks the settings that decide the records ------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [PY, "-m", "rstar.cli", *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd
    )


def test_generate_resume_with_other_settings_is_refused_with_a_diff(inputs, tmp_path):
    from rstar.config import load_config
    from rstar.data.problems import load_problems
    from rstar.search.jobs import prepare_run

    out = tmp_path / "run"
    cfg = load_config("round2", overrides=["model.policy=/elsewhere/policy", "search.rollouts=4"])
    prepare_run(load_problems(inputs / "p.json"), cfg, out, resume=False)
    before = (out / "run.json").read_text()
    proc = _cli(
        ["generate", "--problems", f"{inputs}/p.json", "--out", str(out), "--resume",
         "--policy", f"{inputs}/model", "--set", "search.rollouts=8"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.policy '/elsewhere/policy' -> " in line and "search.rollouts 4 -> 8" in line
    assert (out / "run.json").read_text() == before  # not rewritten to claim the new settings
    # the same settings resume (up to loading the model, which this fake directory is not)
    same = load_config("round2", overrides=["model.policy=/elsewhere/policy", "search.rollouts=4"])
    prepare_run(load_problems(inputs / "p.json"), same, out, resume=True)


def test_eval_resume_with_a_larger_rollout_budget_is_refused(inputs, tmp_path):
    """The issue's case: --mcts-unit rollouts --trajectories 1,2, then 1,2,8 --resume would
    report k=8 from trees whose root N is 2."""
    from rstar.config import load_config
    from rstar.data.problems import load_problems
    from rstar.evaluate import EvalRun, run_config
    from rstar.search.jobs import prepare_run

    out = tmp_path / "eval"
    cfg = load_config("eval", overrides=[f"model.policy={inputs}/model"])
    prepare_run(
        load_problems(inputs / "p.json"),
        run_config(cfg, EvalRun("mcts", "mcts"), 2, "rollouts"),
        out / "mcts",
        False,
    )
    proc = _cli(
        ["eval", "--benchmark", f"{inputs}/p.json", "--policy", f"{inputs}/model", "--mode", "mcts",
         "--mcts-unit", "rollouts", "--trajectories", "1,2,8", "--out", str(out), "--resume"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "search.rollouts 2 -> 8" in proc.stderr.strip().splitlines()[-1]


def test_summary_never_reports_a_budget_its_records_do_not_hold():
    from rstar.evaluate import budget_held

    def rec(pid, mode, **search):
        return {"problem": {"id": pid}, "mode": mode, "config": {"search": search}}

    assert budget_held([rec("a", "mcts", rollouts=2), rec("b", "mcts", rollouts=8)], "rollouts") == 2
    assert budget_held([rec("a", "bon", trajectories=4)]) == 4
    assert budget_held([rec("a", "mcts"), rec("a", "mcts"), rec("b", "mcts")], "searches") == 1


# --- a resumed stage's time counts every attempt -----------------------------------------------


def test_report_stage_time_adds_the_killed_attempt(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from rstar.config import load_config
        from rstar.evolve import RunState

        def stage():
            time.sleep(1.5)
            Path({str(run / "partial.txt")!r}).write_text("x")  # what the stage had done by the kill
            print("wrote", flush=True)
            time.sleep(600)

        RunState(Path({str(run)!r}), load_config("embedded")).run("round1/generate", stage)
        """
    )
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "wrote"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    from rstar.config import load_config
    from rstar.evolve import RunState
    from rstar.report import collect, markdown

    state = RunState(run, load_config("embedded"))
    state.run("round1/generate", lambda: {"done": 1})
    entry = state.data["stages"]["round1/generate"]
    assert entry["resumed"] and entry["seconds"] >= 1.5 and entry["earlier_attempts_s"] >= 1.5, entry
    assert "running" not in json.loads((run / "state.json").read_text())
    data = collect(state.data)
    assert data["resumed"] == ["round1/generate"]
    assert "| round1/generate (resumed: all attempts) |" in markdown(data, total_s=1.0)


def test_resume_of_a_run_written_before_a_new_search_field_is_allowed(inputs, tmp_path):
    """A field a directory's config lacks came later: that run behaved as its default."""
    from rstar.config import load_config
    from rstar.data.problems import load_problems
    from rstar.search.jobs import prepare_run

    out = tmp_path / "run"
    cfg = load_config("round2")
    problems = load_problems(inputs / "p.json")
    prepare_run(problems, cfg, out, resume=False)
    run_json = json.loads((out / "run.json").read_text())
    del run_json["config"]["search"]["seed"]  # as if `seed` were added after this run
    run_json["config"]["search"]["retired_field"] = 3  # and this one removed since
    (out / "run.json").write_text(json.dumps(run_json))
    prepare_run(problems, load_config("round2"), out, resume=True)


def test_second_writer_through_the_cli_is_one_line(inputs, tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        for argv in (
            ["generate", "--problems", f"{inputs}/p.json", "--out", str(out), "--policy", f"{inputs}/model"],
            ["eval", "--benchmark", f"{inputs}/p.json", "--policy", f"{inputs}/model", "--out", str(out)],
        ):
            proc = _cli(argv, tmp_path)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert (
                f"in use by another rstar process (pid {holder.pid})" in proc.stderr.strip().splitlines()[-1]
            )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_dead_writers_forked_child_delays_the_next_writer_only_briefly(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, time
        from rstar.lock import locked_dir
        with locked_dir({str(tmp_path / "d")!r}):
            if os.fork() == 0:  # a forked child inherits the lock's descriptor
                time.sleep(1.5)
                os._exit(0)
            os.kill(os.getpid(), 9)
        """
    )
    subprocess.run([PY, "-c", code], timeout=60)
    from rstar.lock import locked_dir

    t0 = time.monotonic()
    with locked_dir(tmp_path / "d"):
        pass
    assert time.monotonic() - t0 < 10
