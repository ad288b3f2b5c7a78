"""`lamflow` command line. Each command lives in its own module `workflows/cmd_<name>.py` with
`register(subparsers)`; they are discovered here. A `LamflowError` becomes one line on stderr
and exit status 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from lamflow.model.errors import LamflowError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamflow", description="Large Atomic Model workflows: train, test, run pipelines.")
    parser.add_argument("--version", action="version", version=f"lamflow {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    here = Path(__file__).parent
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("cmd_")):
        importlib.import_module(f"lamflow.workflows.{mod}").register(sub)
    return parser


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), or "unknown" when lamflow is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lamflow")
    except PackageNotFoundError:
        return "unknown (not installed; run pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LamflowError as e:
        print(f"lamflow {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lamflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
