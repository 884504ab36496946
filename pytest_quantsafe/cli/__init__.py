"""The ``quantsafe`` command: wires sub-commands, turns errors into exit codes.

Each sub-command lives in ``pytest_quantsafe/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable
``(args) -> int``. This module holds no logic of its own: it parses, dispatches,
and is the one place that turns a ``QuantSafeError`` into stderr text and an exit
status (docs/architecture.md "Exit codes and errors").
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pytest_quantsafe import __version__
from pytest_quantsafe.errors import EXIT_USAGE, QuantSafeError

#: Sub-command modules under ``pytest_quantsafe.cli``, in help order.
COMMANDS: tuple[str, ...] = (
    "scoring",   # score-csv, calibrate, screen-manifest, manifest, card
    "policy",    # policy check, policy diff
    "screen",    # screen, demo
    "attest",    # attest, verify, keygen
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with the documented code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"error[usage]: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = _Parser(prog="quantsafe", description="Refusal-drift release gate for quantized models. "
                     "A screen, not a certificate.")
    parser.add_argument("--version", action="version", version=f"quantsafe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"pytest_quantsafe.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except QuantSafeError as exc:
        sys.stderr.write(exc.diagnostics() + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error[interrupted]: stopped by the user; completed generations are cached.\n")
        return 130


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())

