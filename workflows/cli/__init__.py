"""`lamflow` command line. Two kinds of command, one module each with `register(subparsers)`:

    cli/pipeline/   run and follow pipelines: submit, render, validate, status, watch, logs,
                    list, download, retry (they read a pipeline YAML or a run id)
    cli/tools/      model tools, one stage by hand, no workflow: train, test, md, inspect,
                    compress, clean, distill, export-deepmd, import-deepmd, show, change-bias

They are discovered here and listed in one alphabetical order. A `LamflowError` becomes one line
on stderr and exit status 1; anything else is a bug and keeps its traceback. `python -m
lamflow.workflows.cli` (cli/__main__.py) is the same command, for `torchrun -m`.
"""

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
    for module in command_modules():
        importlib.import_module(module).register(sub)
    return parser


GROUPS = ("pipeline", "tools")


def command_modules() -> list[str]:
    """Every command module of both groups, in the order of their names (the order `--help` lists)."""
    here = Path(__file__).parent
    found = [(m.name, f"{__name__}.{group}.{m.name}") for group in GROUPS
             for m in pkgutil.iter_modules([str(here / group)])]
    return [module for _, module in sorted(found)]


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
