"""Snippets per second: a new `python -c` per snippet vs the sandbox pool vs in-process exec.

All three run the same rStar-style programs in one run, side by side, so the ratios hold even on
a machine that other jobs slow down. `python -c` runs with the same concurrency as the pool
(`workers` processes at a time); in-process `exec` is one thread (the unsafe reference: no
isolation, state shared with the caller).

Two program sets: "light" (plain arithmetic, math, fractions, itertools) and "mixed" (the light
ones plus sympy and numpy programs, about as often as in the authors' released examples). A fresh interpreter pays for importing sympy on every program; the pool imported
it once. The last line is the mixed set's ratio, the workload the search runs.

The pool runs twice, with the syscall filter (`sandbox.seccomp`, the default) and without, in
alternating slices of the same run, so `seccomp_on/off` is the filter's cost side by side.

    python bench/sandbox.py [--seconds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import subprocess
import sys
import time

from rstar.sandbox import SandboxConfig, SandboxPool

LIGHT = [
    "x = 2 * 20 * 12\nprint(x)",
    "import math\nXM = math.sqrt((2 * 12**2 + 2 * 12**2 - 16**2) / 4)\nprint(XM)",
    "from fractions import Fraction\nprint(Fraction(3, 4) + Fraction(5, 6))",
    "total = sum(i * i for i in range(1, 101))\nprint(total)",
    "import itertools\nprint(sum(1 for p in itertools.permutations(range(6)) if p[0] < p[-1]))",
    "print(2**100)",
    "from math import comb\nprint(comb(10, 3) * comb(7, 2))",
    "a, b = 1071, 462\nwhile b:\n    a, b = b, a % b\nprint(a)",
    "from decimal import Decimal, getcontext\ngetcontext().prec = 30\nprint(Decimal(2).sqrt())",
    "count = 0\nfor n in range(1, 1000):\n    if n % 3 == 0 or n % 5 == 0:\n        count += n\nprint(count)",
]
HEAVY = [
    "from sympy import symbols, Eq, solve\nx = symbols('x')\nprint(solve(Eq(x**2 - 5*x + 6, 0), x))",
    "import numpy as np\nprint(np.linalg.det(np.array([[2, 1], [1, 3]])))",
]
# 2 of 12 import sympy/numpy: in the authors' released examples 3 of 18 programs do.
MIXED = LIGHT + HEAVY


def rate_python_c(codes: list[str], seconds: float, workers: int) -> float:
    """Programs per second, each in a new interpreter, `workers` at a time."""

    def one(code: str) -> None:
        subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)

    done, t0 = 0, time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as ex:
        while time.perf_counter() - t0 < seconds or done < len(codes):
            batch = codes[:]  # whole rounds, so each program counts equally
            list(ex.map(one, batch))
            done += len(batch)
    return done / (time.perf_counter() - t0)


def rate_sandbox(pool: SandboxPool, codes: list[str], seconds: float) -> float:
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        results = pool.run_many(codes * 10)
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"sandbox failed on a benchmark program: {bad[0]}")
        done += len(results)
    return done / (time.perf_counter() - t0)


def rate_sandbox_pair(
    on: SandboxPool, off: SandboxPool, codes: list[str], seconds: float
) -> tuple[float, float]:
    """(rate with the filter, rate without), measured in alternating slices."""
    slices = 4
    done = {"on": 0, "off": 0}
    spent = {"on": 0.0, "off": 0.0}
    for _ in range(slices):
        for name, pool in (("on", on), ("off", off)):
            t0 = time.perf_counter()
            rate = rate_sandbox(pool, codes, seconds / slices)
            dt = time.perf_counter() - t0
            done[name] += rate * dt
            spent[name] += dt
    return done["on"] / spent["on"], done["off"] / spent["off"]


def rate_exec(codes: list[str], seconds: float) -> float:
    compiled = [compile(c, "<string>", "exec") for c in codes]
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for code in compiled:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, {"__name__": "__main__"})
        done += len(compiled)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    ap.add_argument("--workers", type=int, default=2, help="sandbox workers (and python -c concurrency)")
    args = ap.parse_args()

    pool = SandboxPool(SandboxConfig(workers=args.workers))
    unfiltered = SandboxPool(SandboxConfig(workers=args.workers, seccomp=False))
    for p in (pool, unfiltered):
        p.run_many(MIXED * 2)  # start and warm every worker before timing
    ratios = {}
    try:
        for name, codes in (("light", LIGHT), ("mixed", MIXED)):
            # Interleaved, so a change in machine load hits all of them alike.
            process = rate_python_c(codes, args.seconds, args.workers)
            sandbox, sandbox_off = rate_sandbox_pair(pool, unfiltered, codes, 2 * args.seconds)
            inproc = rate_exec(codes, args.seconds)
            ratios[name] = sandbox / process
            print(
                f"{name} ({len(codes)} programs): python -c per snippet {process:.1f}/s, "
                f"sandbox {sandbox:.1f}/s (seccomp off: {sandbox_off:.1f}/s), in-process exec {inproc:.1f}/s"
            )
            print(
                f"{name}: sandbox/python-c = {sandbox / process:.1f}x "
                f"(seccomp off: {sandbox_off / process:.1f}x), seccomp_on/off = {sandbox / sandbox_off:.3f}, "
                f"in-process exec/sandbox = {inproc / sandbox:.1f}x"
            )
    finally:
        pool.close()
        unfiltered.close()
    print(f"light_sandbox_vs_process_per_snippet={ratios['light']:.1f}")
    print(f"sandbox_vs_process_per_snippet={ratios['mixed']:.1f}")


if __name__ == "__main__":
    main()
