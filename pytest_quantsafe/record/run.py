"""Reading a screening run back: the records of an output folder and the samples beside them.

The HTML report, the model-card section and ``quantsafe diff`` work from what a
screening wrote (docs/architecture.md "Output folder layout"), never from live
values, so a report can be rebuilt from a downloaded artifact. Rungs are ordered by
quantization: bits per weight of the GGUF file type (or the number in a label such
as ``int8`` / ``GPTQ-INT4``), highest precision first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.record.store import read_record

#: Approximate bits per weight of llama.cpp file types, for ordering rungs only.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0, "BF16": 16.0, "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_K_M": 5.69,
    "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "IQ4_NL": 4.5,
    "IQ4_XS": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66, "Q3_K_S": 3.5, "IQ3_S": 3.44,
    "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K": 2.96, "Q2_K_S": 2.7, "IQ2_M": 2.7, "IQ2_S": 2.5, "IQ2_XS": 2.31,
    "IQ2_XXS": 2.06, "IQ1_M": 1.75, "IQ1_S": 1.56,
}


@dataclass(frozen=True)
class RunEntry:
    """One candidate of a run: its folder name, record and samples (None when no samples.jsonl)."""

    name: str
    path: Path
    record: dict[str, Any]
    samples: list[dict[str, Any]] | None


def bits_per_weight(quantization: str | None) -> float | None:
    """Return the bits per weight a quantization label implies, or None when it names no width."""
    if not quantization:
        return None
    label = quantization.upper()
    if label in BITS_PER_WEIGHT:
        return BITS_PER_WEIGHT[label]
    match = re.search(r"(?:INT|NF|FP|Q|W|BIT)(\d{1,2})|(\d{1,2})[- ]?BIT", label)
    return float(match.group(1) or match.group(2)) if match else None


def quantization_of(record: dict[str, Any]) -> str:
    """Return the candidate's quantization label as the record names it."""
    artifact = (record.get("candidate") or {}).get("artifact") or {}
    return str(artifact.get("quantization") or (artifact.get("metadata") or {}).get("file_type") or "?")


def rung_key(entry: RunEntry) -> tuple[float, str]:
    """Return the sort key of a rung: higher precision first, unknown widths last, then by name."""
    bits = bits_per_weight(quantization_of(entry.record))
    return (-(bits if bits is not None else -1.0), entry.name)


def read_json_record(path: Path) -> dict[str, Any]:
    """Return the record at ``path`` as JSON data, read and checked by the one record reader.

    A missing file, a wrong schema, a missing field, a wrong type or NaN is an InputError
    (exit 2) naming the file and the JSON path (``record/store.py``).
    """
    return read_record(path).to_json()


def read_samples(record_path: Path) -> list[dict[str, Any]] | None:
    """Return the rows of ``samples.jsonl`` beside ``record_path``, or None when there is none."""
    path = record_path.with_name("samples.jsonl")
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise InputError(f"samples line is not JSON: {exc}", where=f"{path}: line {number}",
                             fix="rerun the screening; samples.jsonl is written by quantsafe") from None
        if not isinstance(row, dict) or not {"id", "kind", "flip"} <= set(row):
            raise InputError("samples row lacks id, kind or flip", where=f"{path}: line {number}",
                             fix="rerun the screening; samples.jsonl is written by quantsafe")
        rows.append(row)
    return rows


def load_run(out_dir: Path) -> list[RunEntry]:
    """Return the candidates of the run in ``out_dir`` (``*/record.json``), in quantization order."""
    if not out_dir.is_dir():
        raise InputError("no such output folder", where=str(out_dir),
                         fix="give the --out folder of a screening (it holds <candidate>/record.json)")
    paths = sorted(out_dir.glob("*/record.json"))
    if not paths:
        raise InputError("the folder holds no <candidate>/record.json", where=str(out_dir),
                         fix="give the --out folder of a screening")
    entries = [RunEntry(p.parent.name, p, read_json_record(p), read_samples(p)) for p in paths]
    return sorted(entries, key=rung_key)

