"""Shared test helpers: where the test data lies, single-threaded torch for tiny models, and
the session-wide fixtures that several modules need (built once per run, issue 22): the tiny
policy, the tiny policy after memorising a repeated step, a toy PPM and a toy implicit reward,
a sandbox pool and a grader. The quick evolve run and the docs tour's pre-trained policy start in the background as
soon as the tests are collected (`pytest_collection_modifyitems` below)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rstar.data.problems import PACKAGED_BENCHMARKS

# Everything a test reads lies inside the repository (tests/fixtures/README.md says where each
# file comes from): a user's clone has nothing beside it.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RSTAR_FORMAT = FIXTURES / "rstar_format"
BENCHMARKS = PACKAGED_BENCHMARKS


@contextmanager
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's
    spinning threads were measured 10x slower under load: run a module single-threaded."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2 policy (seed 0) as an HF directory. Read only: a test that
    changes a model writes it elsewhere."""
    from rstar.models.tiny import build_tiny_policy

    with one_thread():
        return build_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy", seed=0)


@pytest.fixture(scope="session")
def repeat_memorised(tiny_dir: Path):
    """(model, tokenizer): the tiny policy after memorising helpers.memorise.REPEAT_TEXT, so
    that greedy decoding goes on with REPEAT_STEP after the header and after every step."""
    from helpers.memorise import REPEAT_CASES, REPEAT_TEXT, memorised_model

    with one_thread():
        return memorised_model(tiny_dir, REPEAT_TEXT, REPEAT_CASES)


@pytest.fixture(scope="session")
def toy_ppm(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """(directory, metrics, records) of a PPM trained ~18 steps on 48 toy pairs
    (helpers/toy_ppm.py): it prefers a step that says `good` to one that says `bad`."""
    from helpers.toy_ppm import TOY_CFG, toy_pairs
    from rstar.training.reward import train_reward

    recs = toy_pairs(48)
    # `make mutate` runs the tests once per mutant: there a PPM trained by the first run is
    # reused from $RSTAR_TEST_TOY_PPM (never set otherwise, so a test run always trains its own).
    cache = os.environ.get("RSTAR_TEST_TOY_PPM")
    if cache and (Path(cache) / "metrics.json").exists():
        return Path(cache), json.loads((Path(cache) / "metrics.json").read_text()), recs
    out = Path(cache) if cache else tmp_path_factory.mktemp("ppm") / "toy"
    with one_thread():
        metrics = train_reward(recs, tiny_dir, out, TOY_CFG, kind="ppm")
    return out, metrics, recs


@pytest.fixture(scope="session")
def toy_implicit(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(directory, metrics) of an implicit reward (`train_reward(kind="implicit")`, DPO) on the
    toy pairs, from the random tiny policy: more epochs until its held-out accuracy is well
    above chance (a cap, not a fixed-loss check). Beta 0.05: against a random reference the
    summed log ratios run to +-100 (a trained policy as reference gives far less), and a larger
    beta saturates tanh."""
    import dataclasses

    from helpers.toy_ppm import TOY_CFG, toy_pairs
    from rstar.training.reward import train_reward

    out = tmp_path_factory.mktemp("implicit") / "toy"
    with one_thread():
        for epochs in (3, 6, 12):
            cfg = dataclasses.replace(TOY_CFG, epochs=epochs, beta=0.05)
            metrics = train_reward(toy_pairs(48), tiny_dir, out, cfg, kind="implicit")
            if metrics["heldout_accuracy"] >= 0.9:
                break
    return out, metrics


@pytest.fixture(scope="session")
def sandbox():
    """A sandbox pool with the defaults a search uses (2 workers, 5 s per program)."""
    from rstar.sandbox import SandboxConfig, SandboxPool

    with SandboxPool(SandboxConfig(workers=2, timeout_s=5)) as pool:
        yield pool


@pytest.fixture(scope="session")
def grader():
    from rstar.grading import Grader

    with Grader(timeout_s=5) as g:
        yield g


# --- the suite's two long items, beside the rest of it ------------------------------------------
# `rstar evolve --quick` (test_evolve.py, killed and resumed) and the docs tour's pre-trained
# policy are the longest items of the suite and each uses one core. When the tests that need
# them are collected, the quick run starts in a background thread, and the tests that need them
# run last, so the other core works through the rest of the suite meanwhile (issue 22: the
# suite's wall time). The tour's `rstar model tiny --pretrain --preset quick --out tiny` is the
# quick run's pre-training recipe, so the tour takes the run's `models/base` (its command then
# finds `tiny` pre-trained and keeps it); without the quick run it pre-trains in a subprocess.
QUICK_EVOLVE = pytest.StashKey[dict]()
TOUR_PRETRAINING = pytest.StashKey[dict]()
QUICK_EVOLVE_TIMEOUT_S = 1800


def _uses(item: pytest.Item, fixture: str) -> bool:
    return fixture in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: start nothing for a test not run
def pytest_collection_modifyitems(session, config, items):
    quick = [i for i in items if _uses(i, "quick_evolve")]
    tour = [i for i in items if _uses(i, "pretrained_tiny")]
    if (not quick and not tour) or config.option.collectonly:
        return
    # the tour and test_pipeline need only the quick run's base (its first minutes), the quick
    # test all of it
    items[:] = [i for i in items if i not in quick and i not in tour] + tour + quick
    if quick:
        config.stash[QUICK_EVOLVE] = start_quick_evolve()
    elif tour:
        from test_docs import start_pretraining

        cache = os.environ.get("RSTAR_DOCS_CACHE")
        where = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="rstar-docs-"))
        config.stash[TOUR_PRETRAINING] = {
            "out": where / "tiny",
            "proc": start_pretraining(where / "tiny"),
            "cleanup": None if cache else where,
        }


def start_quick_evolve() -> dict:
    """test_evolve's quick run (`quick_evolve_killed_and_resumed`) in a daemon thread; the job
    dict gets its `result` or `error` when the thread ends."""
    import threading

    from test_evolve import quick_evolve_killed_and_resumed

    where = Path(tempfile.mkdtemp(prefix="rstar-quick-"))
    job: dict = {"run": where / "run", "procs": [], "stop": threading.Event(), "cleanup": where}
    job |= {"result": None, "error": None}

    def target() -> None:
        try:
            job["result"] = quick_evolve_killed_and_resumed(job["run"], job["procs"], job["stop"])
        except BaseException as e:  # noqa: BLE001 - re-raised in the test that waits for it
            job["error"] = e

    job["thread"] = threading.Thread(target=target, name="quick-evolve", daemon=True)
    job["thread"].start()
    return job


def pytest_unconfigure(config):
    quick = config.stash.get(QUICK_EVOLVE, None)
    if quick is not None:  # the session may have ended early (-x, Ctrl-C): nothing waits for it
        quick["stop"].set()
        for wait in (True, False):  # again after the join: a process started meanwhile
            for proc in quick["procs"]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if wait:
                quick["thread"].join(timeout=30)
        shutil.rmtree(quick["cleanup"], ignore_errors=True)
    job = config.stash.get(TOUR_PRETRAINING, None)
    if job is not None:
        if job["proc"].poll() is None:
            job["proc"].kill()
            job["proc"].wait()
        if job["cleanup"]:
            shutil.rmtree(job["cleanup"], ignore_errors=True)


@pytest.fixture(scope="session")
def quick_evolve(request) -> tuple[Path, dict, object]:
    """(run directory, stages done before the kill, the resumed process) of test_evolve's quick
    run, started in the background when the tests were collected."""
    job = request.config.stash.get(QUICK_EVOLVE, None)
    assert job is not None, "quick_evolve: the background run was not started"
    job["thread"].join(timeout=QUICK_EVOLVE_TIMEOUT_S)
    assert not job["thread"].is_alive(), f"the quick run did not end within {QUICK_EVOLVE_TIMEOUT_S} s"
    if job["error"] is not None:
        raise job["error"]
    return (job["run"], *job["result"])


@pytest.fixture(scope="session")
def pretrained_tiny(request) -> Path:
    """The tour's `tiny`, and test_pipeline's first policy: what `rstar model tiny --pretrain
    --preset quick` makes, a policy that solves some level-1 problems. That is the quick run's
    base policy when the quick run is part of this session (waited for until its
    pre-training stage is done), else pre-trained in the background (above), or once per
    machine with RSTAR_DOCS_CACHE=DIR."""
    import time

    quick = request.config.stash.get(QUICK_EVOLVE, None)
    if quick is not None:
        from test_evolve import stages

        deadline = time.monotonic() + QUICK_EVOLVE_TIMEOUT_S
        while "pretrain" not in stages(quick["run"]):
            assert quick["thread"].is_alive(), (
                f"the quick run ended before its pre-training: {quick['error']!r}"
            )
            assert time.monotonic() < deadline, "the quick run's pre-training did not end in time"
            time.sleep(0.5)
        return quick["run"] / "models" / "base"
    from test_docs import finish_pretraining

    job = request.config.stash.get(TOUR_PRETRAINING, None)
    assert job is not None, "pretrained_tiny: the background pre-training was not started"
    finish_pretraining(job["proc"], job["out"])
    return job["out"]
