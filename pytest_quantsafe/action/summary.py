"""Screening records as the GitHub Action reports them: loaded, checked, ranked, rendered.

``load_records`` reads ``OUT/*/record.json`` with ``record.store.read_record`` (the
schema: no missing field, wrong type or NaN) and ``record.check.check_record`` (band
and verdict are what the recorded policy decides); ``render_summary`` turns the records into the step-summary
Markdown: an overview, a table per candidate, a Mermaid ``xychart-beta`` chart of the
four feature contributions, and the limits sentence.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe.errors import OUTCOME_EXIT, InputError, VerificationFailed
from pytest_quantsafe.record.check import check_record
from pytest_quantsafe.record.model import Record
from pytest_quantsafe.record.store import read_record
from pytest_quantsafe.types import FEATURE_NAMES, LIMITS_SENTENCE

__all__ = ["OUTCOME_EXIT", "CandidateResult", "load_record", "load_records", "read_junit", "render_summary", "worst"]
#: Worse outcomes rank higher, as the CLI ranks exit codes (commands/screen.py): evidence
#: too thin to measure outranks a failed gate, because a reviewer must see it first.
OUTCOME_RANK = {"pass": 0, "fail": 1, "insufficient": 2}
BAND_RANK = {None: -1, "LOW": 0, "MODERATE": 1, "HIGH": 2}
BAND_EMOJI = {"LOW": "🟢", "MODERATE": "🟡", "HIGH": "🔴", None: "⚪"}
OUTCOME_EMOJI = {"pass": "✅", "fail": "❌", "insufficient": "⚠️"}

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's screening record as the Action reports it."""

    path: Path
    #: The record's JSON data (what the tables are rendered from) and the typed record it was read as.
    record: Mapping[str, Any]
    typed: Record

    @property
    def name(self) -> str:
        """Return the candidate's output-folder name (its file name, unique per screening)."""
        return self.path.parent.name

    @property
    def outcome(self) -> str:
        """Return the verdict's outcome: pass, fail or insufficient."""
        return str(self.typed.verdict.outcome)

    @property
    def band(self) -> str | None:
        """Return the record's (effective) band, or None when the data were insufficient."""
        return self.typed.screening.band

    @property
    def rtsi(self) -> float | None:
        """Return the RTSI, or None when the data were insufficient."""
        value = self.typed.screening.rtsi
        return None if value is None else float(value)

    def severity(self) -> tuple[int, int, float]:
        """Return a sort key: higher is worse (outcome, then band, then RTSI)."""
        return (OUTCOME_RANK[self.outcome], BAND_RANK[self.band], -1.0 if self.rtsi is None else self.rtsi)

    def artifact_file(self) -> str | None:
        """Return the candidate's first artifact file for annotations; None for external evidence."""
        files = self.typed.candidate.artifact.files
        return files[0].path if files else None


def load_record(path: Path) -> CandidateResult:
    """Return a record read and checked for consistency, or raise InputError naming file, field and fix."""
    typed = read_record(path)
    try:
        check_record(typed, where=str(path))
    except VerificationFailed as exc:
        raise InputError(f"the record is internally inconsistent: {exc.message}", where=exc.where,
                         fix="rerun the gate; never edit records by hand") from None
    return CandidateResult(path=path, record=typed.to_json(), typed=typed)


def load_records(out_dir: Path) -> list[CandidateResult]:
    """Return the records under ``out_dir/*/record.json``, sorted by folder name."""
    if not out_dir.is_dir():
        raise InputError("the gate wrote no output folder", where=str(out_dir),
                         fix="check the gate step's log: the screening did not run")
    return [load_record(p) for p in sorted(out_dir.glob("*/record.json"))]


def worst(results: Sequence[CandidateResult]) -> CandidateResult:
    """Return the worst candidate: insufficient before failed before passed, then band, then RTSI."""
    return max(results, key=lambda r: r.severity())


def read_junit(path: Path | None) -> dict[str, Any] | None:
    """Return test counts and failing test names from a JUnit XML file, or None when absent."""
    if path is None or not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"unreadable JUnit XML: {exc}", where=str(path)) from exc
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        for kind, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
            if case.find(kind) is not None:
                counts[key] += 1
                if kind != "skipped":
                    failing.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return {**counts, "failing": failing}


# --------------------------------------------------------------------------- step summary


def _cell(text: Any) -> str:
    """Return text safe inside a Markdown table cell."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
            .replace(">", "&gt;").replace("\r", " ").replace("\n", " "))


def _num(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def _feature_digits(name: str) -> int:
    return 1 if name == "mean_tokens_refusal" else 3


def _rate(profile: Mapping[str, Any]) -> str:
    lo, hi = profile["refusal_rate_ci"]
    return (f"{100 * profile['refusal_rate']:.1f}% [{100 * lo:.1f}%, {100 * hi:.1f}%] "
            f"({profile['n_refusals']}/{profile['n_total']})")


def _benign(profile: Mapping[str, Any]) -> str:
    total = profile.get("benign_total", 0)
    if not total:
        return "—"
    return f"{100 * profile['benign_refusal_rate']:.1f}% ({profile['benign_refusals']}/{total})"


def _describe(artifact: Mapping[str, Any]) -> str:
    """Return "`file` (model name, quantization)" for an artifact of the record."""
    ref = str(artifact.get("ref", "")).rstrip("/").rsplit("/", 1)[-1]
    return f"`{_cell(ref)}` ({_cell(artifact.get('name', ''))}, {_cell(artifact.get('quantization', ''))})"


def contribution_chart(result: CandidateResult) -> str:
    """Return a Mermaid ``xychart-beta`` bar chart of the four feature contributions."""
    contributions = [float(result.record["screening"]["contributions"][n]) for n in FEATURE_NAMES]
    top = max(0.1, math.ceil(max(contributions) * 10) / 10)
    title = re.sub(r"[^A-Za-z0-9._ -]", "_", result.name)
    axis = ", ".join(f'"{n}"' for n in FEATURE_NAMES)
    bars = ", ".join(f"{c:.4f}" for c in contributions)
    return "\n".join([
        "```mermaid",
        "xychart-beta",
        f'    title "RTSI contributions (w x phi): {title}"',
        f"    x-axis [{axis}]",
        f'    y-axis "contribution" 0 --> {top:g}',
        f"    bar [{bars}]",
        "```",
    ])


def candidate_section(result: CandidateResult) -> str:
    """Return the Markdown section of one candidate: headline, tables, reasons, chart."""
    rec = result.record
    scr, base, cand = rec["screening"], rec["baseline"]["profile"], rec["candidate"]["profile"]
    rtsi = "insufficient data" if result.rtsi is None else f"RTSI {result.rtsi:.4f}"
    lines = [
        (f"### {BAND_EMOJI[result.band]} {_cell(result.name)} — {result.band or 'no band'}, {rtsi} — "
        f"{OUTCOME_EMOJI[result.outcome]} {result.outcome}"),
        "",
        (f"Candidate {_describe(rec['candidate']['artifact'])} vs baseline {_describe(rec['baseline']['artifact'])}"
        f" · record `{_cell(result.path)}`"),
        "",
        "| feature | baseline | candidate | Δ | φ | contribution |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in FEATURE_NAMES:
        d = _feature_digits(name)
        lines.append(
            f"| {name} | {_num(base[name], d)} | {_num(cand[name], d)} | {_num(scr.get('deltas', {}).get(name), d)} "
            f"| {_num(scr.get('phi', {}).get(name))} | {_num(scr.get('contributions', {}).get(name), 4)} |")
    lines.append(f"| **RTSI** | | | | | **{_num(result.rtsi, 4)}** |")
    lines += [
        "",
        "| refusals | baseline | candidate |",
        "|---|---:|---:|",
        f"| harmful refusal rate [95% Wilson] | {_rate(base)} | {_rate(cand)} |",
        f"| benign over-refusal | {_benign(base)} | {_benign(cand)} |",
        "",
        f"**Verdict: {OUTCOME_EMOJI[result.outcome]} {result.outcome}**"
        + (f" · flags: {', '.join(f'`{_cell(f)}`' for f in scr.get('flags', []))}" if scr.get("flags") else ""),
    ]
    lines += [f"- {_cell(reason)}" for reason in rec["verdict"].get("reasons", [])]
    lines.append("")
    if result.rtsi is not None:
        lines += [contribution_chart(result), ""]
    else:
        lines += ["_No contribution chart: there was not enough refusal evidence to score._", ""]
    return "\n".join(lines)


def render_summary(results: Sequence[CandidateResult], *, missing: int = 0,
                   junit: Mapping[str, Any] | None = None, problems: Sequence[str] = ()) -> str:
    """Return the step-summary Markdown: overview, a section per candidate, the limits sentence."""
    lines = ["## quantsafe refusal-drift gate", ""]
    if results:
        lines += ["| candidate | band | RTSI | harmful refusal rate [95% Wilson] | verdict |",
                  "|---|---|---:|---|---|"]
        for r in results:
            lines.append(f"| {_cell(r.name)} | {BAND_EMOJI[r.band]} {r.band or 'insufficient'} | {_num(r.rtsi, 4)} "
                         f"| {_rate(r.record['candidate']['profile'])} | {OUTCOME_EMOJI[r.outcome]} {r.outcome} |")
        lines.append("")
    for problem in problems:
        lines += [f"> [!CAUTION]\n> {_cell(problem)}", ""]
    if missing:
        lines += [(f"> [!WARNING]\n> {missing} candidate(s) have no screening record: treated as insufficient "
                  "data, never as a pass."), ""]
    if junit is not None:
        lines.append(f"Gate suite: {junit['tests']} tests, {junit['failures']} failed, "
                     f"{junit['errors']} errors, {junit['skipped']} skipped.")
        lines += [f"- `{_cell(name)}`" for name in junit["failing"][:20]]
        lines.append("")
    for r in results:
        lines.append(candidate_section(r))
    lines += ["---", "", f"> {LIMITS_SENTENCE}", ""]
    return "\n".join(lines)
