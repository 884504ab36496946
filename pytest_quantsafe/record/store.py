"""Reading, validating and writing screening records: the one way in and the one way out.

Every record goes through ``parse_record``: non-finite numbers are refused (with
the JSON path of the first one), the data is validated against the shipped JSON
Schema (``schemas/record.schema.json``), then decoded into the typed ``Record``
(``record/model.py``). Each failure is an ``InputError`` (exit 2) naming the
file, the JSON path of the field and the fix. ``write_record`` validates before
it writes and writes atomically (temp file, then rename), so a record on disk is
always a whole, valid one.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import write_atomic
from pytest_quantsafe.errors import InputError
from pytest_quantsafe.record.codec import RECORD_FIX
from pytest_quantsafe.record.model import Record
from pytest_quantsafe.types import RECORD_SCHEMA

__all__ = ["json_path", "parse_record", "read_record", "record_json", "record_schema", "validate_record_json",
           "write_record"]

_FIX = RECORD_FIX


@functools.lru_cache(maxsize=1)
def record_schema() -> dict[str, Any]:
    """Return the shipped JSON Schema of the record (``schemas/record.schema.json``)."""
    text = (resources.files("pytest_quantsafe") / "schemas" / "record.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def json_path(parts: Any) -> str:
    """Return a JSON path (``$.screening.band``, ``$.verdict.rules[0]``) for a sequence of keys and indexes."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _first_non_finite(value: Any, path: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _first_non_finite(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _first_non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def validate_record_json(data: Any, source: str = "<record>") -> None:
    """Return None when ``data`` is finite and valid under the record schema; raise InputError otherwise."""
    import jsonschema

    if not isinstance(data, Mapping) or "schema" not in data:
        raise InputError("not a quantsafe screening record: it has no 'schema' field", where=source,
                         fix="pass the record.json written by `quantsafe screen` or the pytest plugin")
    if data["schema"] != RECORD_SCHEMA:
        raise InputError(f"record schema {data['schema']!r} is not {RECORD_SCHEMA}, the one this quantsafe reads "
                         "(v2 stores the effective band in screening.band, the calibration band beside it)",
                         where=f"{source}: $.schema", fix="re-screen with this quantsafe version")
    bad = _first_non_finite(data, "$")
    if bad:
        raise InputError(f"{bad} is not a finite number (NaN or Infinity); a record holds finite numbers only",
                         where=f"{source}: {bad}", fix=_FIX)
    validator = jsonschema.Draft202012Validator(record_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), [str(p) for p in e.absolute_path]))
    if errors:
        err = errors[0]
        path = json_path(err.absolute_path)
        message = err.message
        if err.validator == "required":
            missing = next((k for k in err.validator_value if isinstance(err.instance, Mapping) and k not in err.instance),
                           None)
            if missing is not None:
                path = f"{path}.{missing}"
                message = f"missing field {missing!r}"
        raise InputError(f"invalid screening record: {path}: {message}", where=f"{source}: {path}",
                         fix=f"{_FIX} (schema: pytest_quantsafe/schemas/record.schema.json, docs/record-format.md)")


def parse_record(data: Any, source: str = "<record>") -> Record:
    """Return the typed record of JSON data after the finiteness and schema checks."""
    validate_record_json(data, source)
    return Record.from_json(data, source)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_record(path: str | Path) -> Record:
    """Return the typed record in ``path`` (a ``record.json``); raise InputError naming file, field and fix."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("screening record not found", where=str(p),
                         fix="give the record.json a screening wrote (OUT/<candidate>/record.json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the screening record: {exc}", where=str(p),
                         fix="check the path and that it is the UTF-8 record.json quantsafe wrote") from None
    try:
        # NaN and Infinity parse here so the schema step can name the field that holds them.
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise InputError(f"the screening record is not valid JSON: {exc.msg}",
                         where=f"{p}: line {exc.lineno} column {exc.colno}", fix=_FIX) from None
    except ValueError as exc:
        raise InputError(f"the screening record is not valid JSON: {exc}", where=str(p), fix=_FIX) from None
    except RecursionError:
        raise InputError("the screening record is nested too deeply to be a record", where=str(p), fix=_FIX) from None
    return parse_record(data, str(p))


def record_json(record: Record | Mapping[str, Any]) -> str:
    """Return the record as stable, indented JSON text (sorted keys, trailing newline)."""
    data = record.to_json() if isinstance(record, Record) else record
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_record(record: Record | Mapping[str, Any], path: str | Path) -> Path:
    """Return ``path`` after writing the validated record there atomically (temp file, then rename)."""
    data = record.to_json() if isinstance(record, Record) else record
    parse_record(data, str(path))  # never write a record a reader would refuse
    target = Path(path)
    try:
        write_atomic(target, record_json(data))
    except OSError as exc:
        raise InputError(f"cannot write the screening record: {exc.strerror or exc}", where=str(target),
                         fix="choose a writable output folder") from None
    return target
