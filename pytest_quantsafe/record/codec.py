"""A type-directed JSON codec for frozen dataclasses (the typed record, ``record/model.py``).

``decode(T, value)`` walks ``T``'s type hints (dataclasses, ``X | None``, ``Literal``,
``tuple[X, ...]``, fixed tuples, ``Mapping[str, X]``, ``float``, ``int``, ``str``,
``bool``, ``Any``) and refuses, with an ``InputError`` naming the source and the JSON
path, anything that does not fit: a missing or unknown field, a wrong type, NaN.
``encode`` is its inverse. Numbers keep their JSON type (an int stays an int) so
``encode(decode(T, d)) == d``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from pytest_quantsafe.errors import InputError

__all__ = ["RECORD_FIX", "decode", "encode", "json_fields"]

#: The fix every malformed-record error gives.
RECORD_FIX = "regenerate the record with `quantsafe screen` (or the pytest plugin); never edit records by hand"
_FIX = RECORD_FIX


def json_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """Return the dataclass fields that are part of the JSON (not those with ``metadata={"json": False}``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def decode(tp: Any, value: Any, source: str, path: str) -> Any:
    """Return ``value`` converted to type ``tp``; raise InputError naming ``source`` and JSON ``path``."""
    def bad(message: str) -> InputError:
        return InputError(message, where=f"{source}: {path}", fix=_FIX)

    origin = get_origin(tp)
    if tp is Any:
        _finite_everywhere(value, source, path)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise bad(f"expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        known = {f.name for f in json_fields(tp)}
        extra = sorted(set(map(str, value)) - known)
        if extra:
            raise bad(f"unknown field {extra[0]!r}")
        kwargs: dict[str, Any] = {}
        for f in json_fields(tp):
            if f.name in value:
                kwargs[f.name] = decode(hints[f.name], value[f.name], source, f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"missing field {f.name!r}", where=f"{source}: {path}.{f.name}", fix=_FIX)
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:  # pragma: no cover - the record uses only X | None unions
            raise TypeError(f"unsupported union {tp}")
        if value is None:
            raise bad(f"expected {_type_name(inner[0])}, got null")
        return decode(inner[0], value, source, path)
    if origin is Literal:
        if value not in get_args(tp):
            raise bad(f"{value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list):
            raise bad(f"expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"expected {len(args)} items, got {len(value)}")
        return tuple(decode(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (Mapping, dict):
        _, value_type = get_args(tp)
        if not isinstance(value, Mapping):
            raise bad(f"expected an object, got {type(value).__name__}")
        return {str(k): decode(value_type, v, source, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise bad(f"{value!r} is not a finite number")
        return value  # an int stays an int: to_json must give back the same JSON
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"expected an integer, got {type(value).__name__}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise bad(f"expected {'a string' if tp is str else 'true or false'}, got {type(value).__name__}")
        return value
    raise TypeError(f"the record codec cannot decode {tp}")  # pragma: no cover - a new field type


def _finite_everywhere(value: Any, source: str, path: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{value!r} is not a finite number", where=f"{source}: {path}", fix=_FIX)
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite_everywhere(v, source, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_everywhere(v, source, f"{path}[{i}]")


def encode(value: Any) -> Any:
    """Return a record value (dataclass, tuple, mapping, scalar) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a field marked omit_none is left out while None (a key only some records carry)
        return {f.name: encode(getattr(value, f.name)) for f in json_fields(type(value))
                if not (f.metadata.get("omit_none") and getattr(value, f.name) is None)}
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value
