"""`make mutate`: the mutation score of the core modules (issue 22), one module at a time.

For each module, a copy of src/ and tests/ is made under $MUTATE_DIR (default
/tmp/rstar-mutate/<module>), so the shared working tree never holds a mutated file or a
`mutants/` folder; mutmut (3.x) mutates only that module there and, per mutant, runs only the
tests of the module's test files that reach the mutated function (the `slow` ones left out). The score printed is
caught / (caught + survived), caught being killed, timed out or crashed; mutants no test reaches ("no tests") count as survived.

    python tests/helpers/mutate.py                   # every module below
    python tests/helpers/mutate.py ppm select        # some of them
    MUTATE_CHILDREN=2 python tests/helpers/mutate.py  # mutants run in parallel (default 1)
    MUTATE_SAMPLE=300 python tests/helpers/mutate.py extract  # a seeded sample of 300 mutants

Not part of CI: a module takes minutes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name -> (files to mutate, test files that cover them, mutant-name globs; empty: all its mutants)
MODULES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "search": (
        [
            "src/rstar/search/tree.py",
            "src/rstar/search/mcts.py",
            "src/rstar/search/beam.py",
            "src/rstar/search/expand.py",
            "src/rstar/search/best_of_n.py",
        ],
        ["tests/test_search.py"],
        [],
    ),
    "extract": (["src/rstar/data/extract.py"], ["tests/test_extract.py"], []),
    "ppm": (["src/rstar/models/ppm.py"], ["tests/test_ppm.py"], []),
    # evaluate.py's answer selection only (trajectories of a record, budgets, the voting rules):
    # the rest of the module is running searches, I/O and reporting.
    "select": (
        ["src/rstar/evaluate.py"],
        ["tests/test_evaluate.py"],
        [
            f"rstar.evaluate.x_{f}__mutmut_*"
            for f in (
                "trajectories",
                "within",
                "_classes",
                "_choices",
                "select",
                "metrics_at_budgets",
                "group_by_problem",
                "budget_held",
            )
        ],
    ),
}


def config(files: list[str], tests: list[str]) -> str:
    lines = [
        "[tool.mutmut]",
        'source_paths = ["src"]',
        f"only_mutate = {json.dumps(files)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "-m", "not slow"]',
        # a mutant that loops is caught sooner (the default waits 15x the test's own time)
        "timeout_multiplier = 5.0",
        # workers fork from a server that has not run the suite: a worker forked from the
        # process that ran it (torch threads, sandbox and grader pools) hung until its timeout
        'process_isolation = "forkserver"',
        "",
        "[tool.pytest.ini_options]",
        'testpaths = ["tests"]',
        "timeout = 600",
        'markers = ["slow: end-to-end tests that train or search with a real model"]',
    ]
    return "\n".join(lines) + "\n"


def run_module(name: str, base: Path, children: int, sample: int = 0) -> dict:
    files, tests, patterns = MODULES[name]
    work = base / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pyproject.toml").write_text(config(files, tests))
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    # the toy PPM of conftest is trained once (by mutmut's first, unmutated run) and reused
    env = {**os.environ, "RSTAR_TEST_TOY_PPM": str(work / "toy-ppm")}
    if sample:
        # Generate the mutants and run none (a name that matches nothing), then test a seeded
        # random sample of them: an estimate of the score for a module too big to run whole.
        subprocess.run(
            [mutmut, "run", "rstar.no-such-mutant"],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # mutmut's "nothing matches": expected
        )
        names = sorted(
            k
            for meta in (work / "mutants").rglob("*.meta")
            for k in json.loads(meta.read_text())["exit_code_by_key"]
            if not patterns or any(fnmatch.fnmatchcase(k, p) for p in patterns)
        )
        patterns = random.Random(0).sample(names, min(sample, len(names)))
    cmd = [mutmut, "run", "--max-children", str(children)] + patterns
    subprocess.run(cmd, cwd=work, check=False, stdout=subprocess.DEVNULL, env=env)
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, text=True, capture_output=True
    ).stdout
    status: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    if patterns:
        status = {k: v for k, v in status.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    counts = Counter(status.values())
    # A mutant that hangs (timeout) or crashes the interpreter is caught as well as one that fails.
    caught = counts["killed"] + counts["timeout"] + counts["segfault"]
    judged = caught + counts["survived"] + counts["no tests"]
    score = caught / judged if judged else 0.0
    survivors = sorted(k for k, v in status.items() if v in ("survived", "no tests"))
    return {"module": name, "score": score, "counts": dict(counts), "survivors": survivors, "dir": str(work)}


def main(argv: list[str]) -> int:
    names = argv or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        print(f"unknown module(s) {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    base = Path(os.environ.get("MUTATE_DIR", "/tmp/rstar-mutate"))
    children = int(os.environ.get("MUTATE_CHILDREN", "1"))
    sample = int(os.environ.get("MUTATE_SAMPLE", "0"))
    results = [run_module(n, base, children, sample) for n in names]
    for r in results:
        of = f" (a sample of {sample})" if sample else ""
        print(
            f"{r['module']:8s} {100 * r['score']:5.1f}% killed{of}  {r['counts']}  (mutmut show NAME in {r['dir']})"
        )
        by_function: dict[str, list[str]] = {}
        for name in r["survivors"]:
            function, _, number = name.rpartition("__mutmut_")
            by_function.setdefault(function, []).append(number)
        for function, numbers in sorted(by_function.items()):
            print(f"    survived in {function}: {len(numbers)} ({', '.join(sorted(numbers, key=int))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
