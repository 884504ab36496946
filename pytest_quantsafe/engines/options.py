"""Engine options as users type them: ``KEY=VALUE`` strings from every front door, typed by the engine's table.

The CLI (``--engine-option``), the plugin (``--quantsafe-engine-option``,
``QUANTSAFE_ENGINE_OPTIONS``, ``quantsafe_engine_options``) and the Action
(``engine-options``) all pass their strings to ``parse_engine_options``. Each engine
module declares its options and their types in ``OPTIONS`` (the keywords of its
``create``); a value is converted by that type (int, float, bool, str), and an unknown
key is a ``UsageError`` naming the key and the accepted ones (docs/architecture.md).
Secrets never travel as options: the openai engine reads its API key from the
environment variable its ``api_key_env`` option names.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any

from pytest_quantsafe.engines.base import ENGINES
from pytest_quantsafe.errors import UsageError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
#: Options that would put a secret on a command line or into a log.
SECRET_OPTIONS = {"api_key": "export the key in an environment variable and pass api_key_env=NAME "
                             "(default OPENAI_API_KEY); the key is never an option, a log line or a record field"}


def option_table(engine: str) -> dict[str, type]:
    """Return {option: type} of ``engine`` ("auto": every engine's options, a key valid for any of them)."""
    names = sorted(ENGINES) if engine == "auto" else [engine]
    table: dict[str, type] = {}
    for name in names:
        if name not in ENGINES:
            raise UsageError(f"unknown engine {name!r}", where="engine", fix=f"choose one of {', '.join(sorted(ENGINES))}")
        table.update(importlib.import_module(ENGINES[name]).OPTIONS)
    return table


def _convert(key: str, text: str, kind: type, where: str) -> Any:
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UsageError(f"engine option {key} must be true or false, got {text!r}", where=where,
                         fix=f"write {key}=true or {key}=false")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"engine option {key} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {text!r}", where=where, fix=f"write {key}=<{kind.__name__}>") from None
    return text


def split_option_list(text: str) -> list[str]:
    """Return the ``KEY=VALUE`` items of an environment value or an Action input.

    One per line; a single line may list several separated by commas (a value that holds
    a comma needs the one-per-line form).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return [item.strip() for item in lines[0].split(",") if item.strip()]
    return lines


def parse_engine_options(engine: str, items: Iterable[str], *, where: str = "--engine-option") -> dict[str, Any]:
    """Return the typed options of ``items`` (``KEY=VALUE`` strings) for ``engine``; bad ones raise UsageError."""
    table = option_table(engine)
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"engine option {item!r} is not KEY=VALUE", where=where, fix="write KEY=VALUE, e.g. threads=2")
        if key in SECRET_OPTIONS:
            raise UsageError(f"engine option {key} is refused: it would put a secret on the command line",
                             where=f"{where} {key}", fix=SECRET_OPTIONS[key])
        if key not in table:
            raise UsageError(f"the {engine} engine has no option {key!r}", where=f"{where} {key}",
                             fix=f"the {engine} engine accepts: {', '.join(sorted(table))}")
        options[key] = _convert(key, value.strip(), table[key], f"{where} {key}")
    return options


def api_key_variable(engine: str, items: Iterable[str]) -> str:
    """Return the environment variable the openai engine reads its key from (option ``api_key_env``), checked."""
    name = str(parse_engine_options(engine, items, where="input engine-options").get("api_key_env")
               or "OPENAI_API_KEY")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name.startswith(("GITHUB_", "QS_", "QUANTSAFE_", "LD_")) \
            or name in ("PATH", "HOME", "PYTHONPATH"):
        raise UsageError(f"api_key_env {name!r} is not a usable environment variable name",
                         where="engine option api_key_env", fix="use a name such as OPENAI_API_KEY")
    return name
