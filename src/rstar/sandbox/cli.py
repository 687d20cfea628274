"""`rstar exec FILE.py`: run one file in the sandbox and print its output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rstar.sandbox.pool import run_code
from rstar.sandbox.settings import OUTPUT_STYLES, SandboxConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="Python file to run")
    parser.add_argument("--timeout", type=float, default=5.0, help="wall-clock (and CPU) limit in seconds")
    parser.add_argument("--memory-mb", type=int, default=512, help="address space the program may add")
    parser.add_argument(
        "--output-style",
        choices=OUTPUT_STYLES,
        default="faithful",
        help="faithful: what Python prints; authors: the observation the authors' executor produced",
    )
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    code = Path(args.file).read_text()
    cfg = SandboxConfig(timeout_s=args.timeout, memory_mb=args.memory_mb, output_style=args.output_style)
    result = run_code(code, cfg)
    sys.stdout.write(result.stdout)
    if result.stdout and not result.stdout.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not result.ok:
        print(result.observation(), file=sys.stderr)
        return 1
    return 0
