"""Shared test helpers: where the test data lies, and single-threaded torch for tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from rstar.data.problems import PACKAGED_BENCHMARKS

# Everything a test reads lies inside the repository (tests/fixtures/README.md says where each
# file comes from): a user's clone has nothing beside it.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RSTAR_FORMAT = FIXTURES / "rstar_format"
BENCHMARKS = PACKAGED_BENCHMARKS


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's
    spinning threads were measured 10x slower under load: run a module single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
