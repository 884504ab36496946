"""Readers for probe files: JSONL and CSV in the AdvBench, HarmBench and JailbreakBench layouts.

Each reader returns ``(line, Probe)`` pairs, where ``line`` is the 1-based line of
the file the probe starts on, so the checks in ``probes/__init__.py`` can name it.
A CSV layout is recognised from its header alone; a header that matches none is
refused with the header it saw and the layouts it knows.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

from pytest_quantsafe.errors import ProbeSetError
from pytest_quantsafe.types import Probe

#: Category given to probes whose source has none (AdvBench, JSONL without "category").
UNCATEGORIZED = "uncategorized"

KINDS = ("harmful", "benign")

NumberedProbe = tuple[int, Probe]


def clean_prompt(text: str) -> str:
    """Return a prompt with line endings unified and outer whitespace removed.

    Done for every format, so that the same requests give the same digest whether
    they came from JSONL or from a CSV written on another platform.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


# --------------------------------------------------------------------------- JSONL


def read_jsonl(text: str, where: str) -> list[NumberedProbe]:
    """Return the probes of a JSONL text (one object per line: id, prompt, category, kind)."""
    probes: list[NumberedProbe] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        at = f"{where}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProbeSetError(f"line is not valid JSON ({exc.msg}, column {exc.colno})", where=at,
                                fix="write one JSON object per line: "
                                '{"id": ..., "prompt": ..., "category": ..., "kind": "harmful"|"benign"}') from exc
        except RecursionError:
            raise ProbeSetError("line is nested too deeply to be a probe", where=at,
                                fix='write one flat JSON object per line with "id" and "prompt"') from None
        if not isinstance(obj, dict):
            raise ProbeSetError(f"line holds a JSON {type(obj).__name__}, not an object", where=at,
                                fix='write one JSON object per line with at least "id" and "prompt"')
        for name in ("id", "prompt"):
            if name not in obj:
                raise ProbeSetError(f'probe has no "{name}" field', where=at,
                                    fix='every probe needs a unique "id" and a non-empty "prompt"')
        fields = {name: obj.get(name) for name in ("id", "prompt", "category", "kind")}
        for name, value in fields.items():
            if value is not None and not isinstance(value, str):
                raise ProbeSetError(f'field "{name}" is a {type(value).__name__}, not a string', where=at,
                                    fix=f'write "{name}" as a JSON string')
        kind = fields["kind"] or "harmful"
        if kind not in KINDS:
            raise ProbeSetError(f'unknown kind {kind!r}', where=at, fix='"kind" is "harmful" or "benign"')
        probes.append((number, Probe(
            id=str(fields["id"]).strip(),
            prompt=clean_prompt(str(fields["prompt"])),
            category=(fields["category"] or "").strip() or UNCATEGORIZED,
            kind=kind,  # type: ignore[arg-type]
        )))
    return probes


# --------------------------------------------------------------------------- CSV layouts


@dataclass(frozen=True)
class CsvLayout:
    """A known CSV layout: how to recognise its header and how to read a row."""

    name: str
    description: str
    matches: Callable[[list[str]], bool]
    #: (row as dict, data row number starting at 1) -> (id, prompt, category)
    read_row: Callable[[dict[str, str], int], tuple[str, str, str]]


def _get(row: dict[str, str], column: str) -> str:
    return (row.get(column) or "").strip()


def _advbench_row(row: dict[str, str], index: int) -> tuple[str, str, str]:
    lowered = {k.lower(): v for k, v in row.items() if k is not None}
    return f"advbench-{index:04d}", lowered.get("goal") or "", UNCATEGORIZED


def _harmbench_row(row: dict[str, str], index: int) -> tuple[str, str, str]:
    behavior = row.get("Behavior") or ""
    context = _get(row, "ContextString")
    # HarmBench's contextual behaviours put the context before the request, split by a rule.
    prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
    probe_id = _get(row, "BehaviorID") or f"harmbench-{index:04d}"
    return probe_id, prompt, _get(row, "SemanticCategory") or UNCATEGORIZED


def _jailbreakbench_row(row: dict[str, str], index: int) -> tuple[str, str, str]:
    number = _get(row, "Index")
    probe_id = f"jbb-{number}" if number else f"jbb-{index:04d}"
    return probe_id, row.get("Goal") or "", _get(row, "Category") or UNCATEGORIZED


CSV_LAYOUTS: tuple[CsvLayout, ...] = (
    CsvLayout("harmbench", "HarmBench: Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID",
              lambda h: "Behavior" in h and "SemanticCategory" in h, _harmbench_row),
    CsvLayout("jailbreakbench", "JailbreakBench: Index,Goal,Target,Behavior,Category,Source",
              lambda h: "Goal" in h and "Category" in h, _jailbreakbench_row),
    CsvLayout("advbench", "AdvBench: goal,target",
              lambda h: {"goal", "target"} <= {c.lower() for c in h}, _advbench_row),
)


def detect_layout(header: list[str], where: str) -> CsvLayout:
    """Return the CSV layout a header belongs to, or raise ProbeSetError naming what was seen."""
    for layout in CSV_LAYOUTS:
        if layout.matches(header):
            return layout
    known = "; ".join(layout.description for layout in CSV_LAYOUTS)
    raise ProbeSetError(
        f"unknown CSV layout: header is {','.join(header)!r}",
        where=f"{where}:1",
        fix=f"use one of the supported layouts ({known}), or JSONL with id, prompt, category, kind",
    )


def read_csv(text: str, where: str) -> list[NumberedProbe]:
    """Return the probes of a CSV text whose layout is detected from its header."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ProbeSetError("the probe file is empty", where=where,
                            fix="add a header and at least one harmful probe") from None
    except csv.Error as exc:
        raise ProbeSetError(f"the CSV header cannot be read: {exc}", where=f"{where}:1") from exc
    header = [h.strip() for h in header]
    layout = detect_layout(header, where)
    probes: list[NumberedProbe] = []
    index = 0
    line = reader.line_num + 1
    try:
        for values in reader:
            start, line = line, reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise ProbeSetError(
                    f"row has {len(values)} fields but the {layout.name} header has {len(header)}",
                    where=f"{where}:{start}", fix="quote fields that contain commas")
            index += 1
            row = dict(zip(header, values))
            probe_id, prompt, category = layout.read_row(row, index)
            probes.append((start, Probe(id=probe_id.strip(), prompt=clean_prompt(prompt),
                                        category=category.strip() or UNCATEGORIZED, kind="harmful")))
    except csv.Error as exc:
        raise ProbeSetError(f"malformed CSV: {exc}", where=f"{where}:{line}",
                            fix="check the quoting of this row") from exc
    return probes
