"""Shared test helpers: where ../shared/data lies, and single-threaded torch for tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

# The project's data sits beside the checkout (CI clones main next to a copy of shared/);
# tests read it in place.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RSTAR_FORMAT = SHARED_DATA / "rstar_format"
BENCHMARKS = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's
    spinning threads were measured 10x slower under load: run a module single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
