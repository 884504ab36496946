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
from pytest_quantsafe.cli import jsonout
from pytest_quantsafe.errors import EXIT_USAGE, QuantSafeError, UsageError

#: Sub-command modules under ``pytest_quantsafe.cli``, in help order.
COMMANDS: tuple[str, ...] = (
    "scoring",   # score-csv, calibrate, screen-manifest, manifest, card
    "policy",    # policy check, policy diff
    "screen",    # screen, demo
    "attest",    # attest, verify, keygen
    "report",    # diff, report, model-card
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with the documented code 2."""

    #: Under --json a usage error becomes the error document instead of usage text.
    json_mode = False

    def error(self, message: str) -> None:  # type: ignore[override]
        if _Parser.json_mode:
            raise UsageError(message, where=self.prog, fix=f"see `{self.prog} --help`")
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
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not jsonout.wants_json(arguments):
        return _run(build_parser().parse_args(arguments))
    # --json: everything the command prints goes to stderr, the one JSON document to stdout.
    stdout = sys.stdout
    sys.stdout = sys.stderr
    _Parser.json_mode = True
    command = arguments[0] if arguments else "quantsafe"
    error: QuantSafeError | None = None
    args = None
    try:
        args = build_parser().parse_args(arguments)
        command = jsonout.command_name(args)
        code = _run(args, raise_errors=True)
    except QuantSafeError as exc:
        sys.stderr.write(exc.diagnostics() + "\n")
        error, code = exc, exc.exit_code
    finally:
        sys.stdout = stdout
        _Parser.json_mode = False
    if code == 130:
        error = UsageError("stopped by the user; completed generations are cached", fix="run the command again")
    jsonout.write(stdout, jsonout.envelope(command, code, result=getattr(args, "json_result", None),
                                           error=error))
    return code


def _run(args: argparse.Namespace, *, raise_errors: bool = False) -> int:
    try:
        return int(args.func(args))
    except QuantSafeError as exc:
        if raise_errors:
            raise
        sys.stderr.write(exc.diagnostics() + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error[interrupted]: stopped by the user; completed generations are cached.\n")
        return 130
    except Exception as exc:  # noqa: BLE001  # a third-party failure: typed, never a traceback
        from pytest_quantsafe.errors import from_exception

        error = from_exception(exc, f"quantsafe {getattr(args, 'command', None) or ''}".strip())
        sys.stderr.write(error.diagnostics() + "\n")
        return error.exit_code


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())

