"""The sandbox's settings: limits of one program run and the shape of the pool (`SandboxConfig`,
the `sandbox` section of `rstar.config.Config`). Standard library only: the worker processes import
this package too."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

OUTPUT_STYLES = ("faithful", "authors")
ISOLATION_MODES = ("auto", "rlimits")

# Imported by every worker before it forks programs, so programs find them loaded. Fork time
# grows with the worker's memory, so "light" workers import only common math modules; programs
# that mention numpy/sympy/mpmath go to "heavy" workers. Other modules are imported by the program
# itself (in the namespace sandbox the interpreter stays readable after the privilege drop).
LIGHT_PRELOAD: tuple[str, ...] = (
    "math", "cmath", "fractions", "decimal", "statistics", "random", "itertools", "functools",
    "operator", "collections", "heapq", "bisect", "string", "re", "datetime",
)  # fmt: skip
HEAVY_PRELOAD: tuple[str, ...] = ("numpy", "sympy", "mpmath", "secrets")

# The authors' executor (rStar-math `python_tool.py`, from MARIO's PythonInterpreter) cut each
# observation to this many characters (first half + "..." + last half).
AUTHORS_MAX_CHARS = 1024
# The longest a program may run (a day): larger limits overflow the worker's deadline arithmetic.
MAX_TIMEOUT_S = 86400.0


def _f(default: Any, help: str) -> Any:
    """A field with its meaning attached (`rstar config show` prints it)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SandboxConfig:
    """Limits of one program run and the shape of the pool; the `sandbox` section of
    `rstar.config.Config` (each field's help says what it sets)."""

    timeout_s: float = _f(5.0, "wall-clock limit of one program run (CPU time is limited to the same)")
    memory_mb: int = _f(
        512, "address space a program may add on top of the warm interpreter it is forked from"
    )
    max_output_bytes: int = _f(64_000, "output beyond this is cut (with a marker) and the run is an error")
    max_file_bytes: int = _f(1_000_000, "largest file a program may write (RLIMIT_FSIZE)")
    max_processes: int = _f(
        16, "processes a program may have at once, itself included (RLIMIT_NPROC: fork bombs stop here)"
    )
    workers: int = _f(2, "programs run at the same time (warm sandbox workers)")
    output_style: str = _f(
        "faithful",
        "'faithful' (what Python prints) or 'authors' (their executor: 4-decimal floats, their error format) "
        "for policies trained on their released data",
    )
    isolation: str = _f(
        "auto",
        "'auto' (namespaces where the platform allows) or 'rlimits' (rlimits, a private working directory "
        "and, as root, the privilege drop only); docs/sandbox.md",
    )
    light_workers: bool = _f(
        True,
        "route programs that do not mention numpy/sympy/mpmath to workers that did not import them (a fork "
        "of a small interpreter is cheaper); false = every worker is heavy",
    )
    preload: list[str] = _f(LIGHT_PRELOAD, "modules every worker imports before forking programs")
    heavy_preload: list[str] = _f(HEAVY_PRELOAD, "modules heavy workers import as well")
    seccomp: bool = _f(
        True,
        "a syscall filter on model code: no sockets, namespaces, ptrace, mounts, bpf, keyrings, perf, kexec "
        "or module loading (EPERM); needs libseccomp (docs/sandbox.md)",
    )
    tmpfs_mb: int = _f(64, "size of the private /tmp (namespace isolation only)")
    authors_max_chars: int = _f(
        AUTHORS_MAX_CHARS, "output cut of the 'authors' style (their `truncate_string`)"
    )

    def __post_init__(self) -> None:
        if self.output_style not in OUTPUT_STYLES:
            raise ValueError(f"output_style={self.output_style!r}: expected {' | '.join(OUTPUT_STYLES)}")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={self.isolation!r}: expected {' | '.join(ISOLATION_MODES)}")
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= MAX_TIMEOUT_S):
            raise ValueError(f"timeout_s={self.timeout_s}: expected seconds in (0, {MAX_TIMEOUT_S:g}]")
        if self.memory_mb <= 0 or self.workers < 1 or self.max_processes < 1 or self.tmpfs_mb < 1:
            raise ValueError("memory_mb, workers, max_processes and tmpfs_mb must be positive")
        if self.max_output_bytes < 1 or self.max_file_bytes < 0:
            raise ValueError("max_output_bytes must be positive and max_file_bytes not negative")
        self.preload = list(self.preload)
        self.heavy_preload = list(self.heavy_preload)
