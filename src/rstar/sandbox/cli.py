"""`rstar exec FILE.py`: run one file in the sandbox and print its output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rstar import RstarError
from rstar.sandbox.pool import run_code
from rstar.sandbox.settings import MAX_TIMEOUT_S, OUTPUT_STYLES, SandboxConfig


def _seconds(text: str) -> float:
    from rstar.checks import seconds

    return seconds(text)


def _megabytes(text: str) -> int:
    from rstar.checks import positive_int

    return positive_int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="Python file to run")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        help=f"wall-clock (and CPU) limit in seconds (0 < S <= {MAX_TIMEOUT_S:g})",
    )
    parser.add_argument("--memory-mb", type=_megabytes, default=512, help="address space the program may add")
    parser.add_argument(
        "--output-style",
        choices=OUTPUT_STYLES,
        default="faithful",
        help="faithful: what Python prints; authors: the observation the authors' executor produced",
    )
    parser.set_defaults(func=_cli)


def read_program(path: str) -> str:
    """The text of a Python file; RstarError naming it if it is missing or not UTF-8 text."""
    p = Path(path)
    if not p.is_file():
        raise RstarError(f"{path}: no such file" if not p.exists() else f"{path}: not a regular file")
    data = p.read_bytes()
    if b"\0" in data:
        raise RstarError(f"{path}: a binary file (it holds NUL bytes), not a Python program")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RstarError(f"{path}: not UTF-8 text (byte {e.start}), not a Python program") from None


def _cli(args: argparse.Namespace) -> int:
    code = read_program(args.file)
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
