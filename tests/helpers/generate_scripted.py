"""`rstar generate` with the scripted policy, as a separate process that a test can kill -9.

usage: python generate_scripted.py OUT N_PROBLEMS [--resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: scripted, test_search

from rstar.config import load_config  # noqa: E402
from rstar.search.jobs import open_backends  # noqa: E402
from rstar.search.run import generate  # noqa: E402
from scripted import ScriptedPolicy  # noqa: E402
from test_search import problems  # noqa: E402

if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2])
    cfg = load_config(
        "round2", overrides=["search.rollouts=4", "search.num_samples=3", "scheduler.max_inflight=4"]
    )
    # a slow policy, so that the run is still going when the test kills it
    with open_backends(cfg, policy=ScriptedPolicy(delay_s=0.02)) as backends:
        generate(problems(n), cfg, out, resume="--resume" in sys.argv, backends=backends, show_progress=False)
