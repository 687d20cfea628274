"""The sandbox's settings: limits of one program run and the shape of the pool (`SandboxConfig`,
the `sandbox` section of `rstar.config.Config`). Standard library only: the worker processes import
this package too."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class SandboxConfig:
    """Limits of one program run and the shape of the pool.

    timeout_s: wall-clock limit of one program; CPU time is limited to the same (rounded up).
    memory_mb: address space a program may add on top of the warm interpreter it is forked from.
    max_output_bytes: stdout beyond this is cut (with a marker) and the run is an error.
    max_file_bytes: largest file a program may write (RLIMIT_FSIZE).
    max_processes: processes a program may have at once, itself included (RLIMIT_NPROC).
    workers: programs run at the same time.
    output_style: "faithful" (what Python prints) or "authors" (their executor's observations).
    isolation: "auto" (namespaces where the platform allows) or "rlimits" (rlimits, a private
        working directory and, as root, the privilege drop only).
    light_workers: route programs that do not mention numpy/sympy/mpmath to workers that did not
        import them (a fork of a small interpreter is cheaper); False = every worker is heavy.
    preload: modules every worker imports before forking programs.
    heavy_preload: modules heavy workers import as well.
    tmpfs_mb: size of the private /tmp (namespaces only).
    authors_max_chars: output cut of the authors' style (their `truncate_string`).
    """

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_bytes: int = 64_000
    max_file_bytes: int = 1_000_000
    max_processes: int = 16
    workers: int = 2
    output_style: str = "faithful"
    isolation: str = "auto"
    light_workers: bool = True
    preload: tuple[str, ...] = LIGHT_PRELOAD
    heavy_preload: tuple[str, ...] = HEAVY_PRELOAD
    tmpfs_mb: int = 64
    authors_max_chars: int = AUTHORS_MAX_CHARS

    def __post_init__(self) -> None:
        if self.output_style not in OUTPUT_STYLES:
            raise ValueError(f"output_style must be one of {OUTPUT_STYLES}, got {self.output_style!r}")
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        if self.timeout_s <= 0 or self.memory_mb <= 0 or self.workers < 1 or self.max_processes < 1:
            raise ValueError("timeout_s, memory_mb, workers and max_processes must be positive")
        self.preload = tuple(self.preload)
        self.heavy_preload = tuple(self.heavy_preload)
