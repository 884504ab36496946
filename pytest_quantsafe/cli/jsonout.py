"""``--json`` for every command that prints a result: one JSON document on stdout.

A command adds the flag with ``add_json_flag(parser)`` and hands its result to
``set_result(args, result)``; ``cli.main`` then writes the envelope
``{"schema": "quantsafe.cli.v1", "command", "exit_code", "result"}`` (or ``"error"``
with code, message, where, fix and exit_code) as the only thing on stdout, while the
human text the command prints goes to stderr. The envelope's schema ships as
``schemas/cli.schema.json`` (``command`` is the discriminator); see
docs/architecture.md "Front doors".
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from typing import Any, TextIO

from pytest_quantsafe.errors import QuantSafeError

SCHEMA_ID = "quantsafe.cli.v1"


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--json`` to ``parser``."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout (schema quantsafe.cli.v1); human text on stderr")


def wants_json(argv: list[str]) -> bool:
    """Return True when ``--json`` is among the arguments (known before parsing, for usage errors)."""
    return "--json" in argv


def set_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Record the command's machine-readable result; printed by ``cli.main`` under ``--json``."""
    args.json_result = result


def command_name(args: argparse.Namespace) -> str:
    """Return the command's name as typed, e.g. ``screen`` or ``policy diff``."""
    name = str(getattr(args, "command", None) or "quantsafe")
    sub = getattr(args, "policy_command", None)
    return f"{name} {sub}" if sub else name


def envelope(command: str, exit_code: int, *, result: dict[str, Any] | None = None,
             error: QuantSafeError | None = None) -> dict[str, Any]:
    """Return the document ``--json`` prints: the result, or the error object."""
    doc: dict[str, Any] = {"schema": SCHEMA_ID, "command": command, "exit_code": exit_code}
    if error is not None:
        doc["error"] = {"code": error.code, "message": error.message, "where": error.where, "fix": error.fix,
                        "exit_code": exit_code}
    else:
        doc["result"] = result if result is not None else {}
    return doc


def write(stream: TextIO, doc: dict[str, Any]) -> None:
    """Write ``doc`` as the one JSON document on ``stream`` (the stdout the command did not print to)."""
    stream.write(json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    stream.flush()


def load_schema() -> dict[str, Any]:
    """Return the packaged JSON Schema of the envelope."""
    text = resources.files("pytest_quantsafe").joinpath("schemas/cli.schema.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
