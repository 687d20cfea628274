"""Shared test helpers: where the test data lies, single-threaded torch for tiny models, and
the session-wide fixtures that several modules need (built once per run, issue 22): the tiny
policy, the tiny policy after memorising a repeated step, a toy PPM, a sandbox pool and a
grader. The docs tour's pre-training starts in the background as soon as the tests are
collected (`pytest_collection_modifyitems` below)."""

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


# --- the docs tour's pre-training, beside the rest of the suite ------------------------------
# `rstar model tiny --pretrain` (tests/test_docs.py's stand-in for the tour's one slow command)
# is the longest single step of the suite and uses one core. It starts in a subprocess when the
# tests that need it are collected, and those tests run last, so the other core works through
# the rest of the suite meanwhile (issue 22: the suite's wall time).
TOUR_PRETRAINING = pytest.StashKey[dict]()


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselection: start nothing for a test not run
def pytest_collection_modifyitems(session, config, items):
    tour = [i for i in items if "pretrained_tiny" in getattr(i, "fixturenames", ())]
    if not tour or config.option.collectonly:
        return
    from test_docs import start_pretraining

    items[:] = [i for i in items if i not in tour] + tour
    cache = os.environ.get("RSTAR_DOCS_CACHE")
    where = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="rstar-docs-"))
    config.stash[TOUR_PRETRAINING] = {
        "out": where / "tiny",
        "proc": start_pretraining(where / "tiny"),
        "cleanup": None if cache else where,
    }


def pytest_unconfigure(config):
    job = config.stash.get(TOUR_PRETRAINING, None)
    if job is None:
        return
    if job["proc"].poll() is None:  # the run ended early (-x, Ctrl-C): nothing waits for it
        job["proc"].kill()
        job["proc"].wait()
    if job["cleanup"]:
        shutil.rmtree(job["cleanup"], ignore_errors=True)


@pytest.fixture(scope="session")
def pretrained_tiny(request) -> Path:
    """The tour's stand-in policy: `rstar model tiny --pretrain` with its defaults, built once
    per session in the background (above), or once per machine with RSTAR_DOCS_CACHE=DIR."""
    from test_docs import finish_pretraining

    job = request.config.stash.get(TOUR_PRETRAINING, None)
    assert job is not None, "pretrained_tiny: the background pre-training was not started"
    finish_pretraining(job["proc"], job["out"])
    return job["out"]
