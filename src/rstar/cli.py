"""The `rstar` command line: one subcommand per stage of the method.

Each subcommand lives beside the code it drives: the module named in COMMANDS defines
`add_arguments(parser)` (which sets `func`) and is imported only when its command runs, so
`rstar --help` and light commands such as `rstar grade` do not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rstar import RstarError

# name -> (module that implements it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "exec": ("rstar.sandbox.cli", "run a Python file in the sandbox and print its output"),
    "grade": ("rstar.grading", "check answer equivalence (math-verify, killable workers)"),
    "problems": ("rstar.data.sets", "load a problem set (a file, hf:NAME, world:...) and print it as JSONL"),
    "model": ("rstar.models.tiny", "write a tiny Qwen2 policy (and tokenizer) for tests and demos"),
    "config": ("rstar.config", "show the resolved config of a preset with each field's meaning"),
    "generate": ("rstar.search.run", "run data-generation search over a problem file into tree files"),
    "solve": ("rstar.search.solve", "solve one question and print the chosen trajectory"),
    "extract": ("rstar.data.extract", "extract SFT trajectories or PPM preference pairs from tree files"),
    "train": ("rstar.training.cli", "train the policy (SFT) or the reward model (PPM/ORM/PQM)"),
    "evolve": ("rstar.evolve", "run the 4-round self-evolution loop (embedded demo by default)"),
    "eval": ("rstar.evaluate", "evaluate search modes on a benchmark, with scaling curves"),
    "view": ("rstar.view", "write a self-contained HTML viewer of search trees"),
    "report": ("rstar.report", "rewrite an evolve run's report, or combine several runs (median, range)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rstar COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`rstar COMMAND --help` describes one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from rstar import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"rstar: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rstar {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except RstarError as e:
        print(f"rstar {name}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if e.filename is None:
            raise  # not about a path the user gave: a bug, keep its traceback
        print(f"rstar {name}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rstar ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"rstar {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
