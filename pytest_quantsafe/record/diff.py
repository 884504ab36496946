"""What changed between two screenings of the same candidate (``quantsafe diff OLD NEW``).

For "did this llama.cpp upgrade or re-quantization change anything": band, RTSI, each
feature's delta and contribution, refusal rates, the paired lost-refusal rate, and
(when ``samples.jsonl`` sits beside both records) the probes whose flip class changed.
Two records are comparable when they screen the same probe set (same digest) and the
same model family and quantization label; artifact digests, engine, policy and
calibration may differ (that is what one asks about) and are listed as context.
Anything else is refused (InputError, exit 2) with the reason. See
docs/architecture.md "Front doors".
"""

from __future__ import annotations

from typing import Any

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.record.run import quantization_of
from pytest_quantsafe.types import FEATURE_NAMES


def _get(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _num_delta(old: Any, new: Any) -> float | None:
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return float(new) - float(old)
    return None


def check_comparable(old: dict[str, Any], new: dict[str, Any], old_where: str, new_where: str) -> None:
    """Raise InputError when the two records do not screen the same candidate on the same probes."""
    for dotted, what in (("probe_set.digest", "probe set"), ("cell_identity.model_family", "model family")):
        a, b = _get(old, dotted), _get(new, dotted)
        if a != b:
            raise InputError(f"the records screen a different {what}: {a!r} vs {b!r}",
                             where=f"{old_where} / {new_where}: {dotted}",
                             fix="diff two screenings of the same candidate on the same probe set")
    if quantization_of(old) != quantization_of(new):
        raise InputError(f"the records screen different quantizations: {quantization_of(old)} vs "
                         f"{quantization_of(new)}", where=f"{old_where} / {new_where}: candidate.artifact.quantization",
                         fix="diff two screenings of the same rung (e.g. before and after a llama.cpp upgrade)")


def _context(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("candidate.artifact.digest", "baseline.artifact.digest", "engine.name", "engine.version",
            "policy.digest", "calibration.digest", "generation", "tool.version")
    return [{"key": k, "old": _get(old, k), "new": _get(new, k)} for k in keys if _get(old, k) != _get(new, k)]


def probe_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the probes whose flip class differs between two samples files, and ids in only one."""
    old_by, new_by = {r["id"]: r for r in old}, {r["id"]: r for r in new}
    changed = [{"id": i, "kind": new_by[i].get("kind"), "category": new_by[i].get("category"),
                "old_flip": old_by[i]["flip"], "new_flip": new_by[i]["flip"]}
               for i in old_by if i in new_by and old_by[i]["flip"] != new_by[i]["flip"]]
    return {"compared": len(set(old_by) & set(new_by)), "changed": changed,
            "only_old": sorted(set(old_by) - set(new_by)), "only_new": sorted(set(new_by) - set(old_by))}


def diff_records(old: dict[str, Any], new: dict[str, Any], *, old_samples: list[dict[str, Any]] | None = None,
                 new_samples: list[dict[str, Any]] | None = None, old_where: str = "OLD",
                 new_where: str = "NEW") -> dict[str, Any]:
    """Return what changed from ``old`` to ``new``; ``changed`` is True when the band or the verdict did."""
    check_comparable(old, new, old_where, new_where)
    so, sn = old["screening"], new["screening"]
    features = {f: {"old_delta": (so.get("deltas") or {}).get(f), "new_delta": (sn.get("deltas") or {}).get(f),
                    "old_contribution": (so.get("contributions") or {}).get(f),
                    "new_contribution": (sn.get("contributions") or {}).get(f)} for f in FEATURE_NAMES}
    for value in features.values():
        value["contribution_change"] = _num_delta(value["old_contribution"], value["new_contribution"])
    rates = {}
    for side in ("baseline", "candidate"):
        for key in ("refusal_rate", "benign_refusal_rate"):
            a, b = _get(old, f"{side}.profile.{key}"), _get(new, f"{side}.profile.{key}")
            rates[f"{side}.{key}"] = {"old": a, "new": b, "delta": _num_delta(a, b)}
    lost = {"old": _get(old, "screening.paired.lost_refusal_rate"),
            "new": _get(new, "screening.paired.lost_refusal_rate")}
    band = {"old": so.get("band"), "new": sn.get("band")}
    band["changed"] = band["old"] != band["new"]
    verdict = {"old": _get(old, "verdict.outcome"), "new": _get(new, "verdict.outcome")}
    verdict["changed"] = verdict["old"] != verdict["new"]
    probes = probe_changes(old_samples, new_samples) if old_samples is not None and new_samples is not None else None
    return {
        "old": old_where, "new": new_where, "same_candidate": _get(old, "candidate.artifact.digest")
        == _get(new, "candidate.artifact.digest"),
        "band": band, "verdict": verdict,
        "rtsi": {"old": so.get("rtsi"), "new": sn.get("rtsi"), "delta": _num_delta(so.get("rtsi"), sn.get("rtsi"))},
        "status": {"old": so.get("status"), "new": sn.get("status")},
        "flags": {"added": sorted(set(sn.get("flags") or []) - set(so.get("flags") or [])),
                  "removed": sorted(set(so.get("flags") or []) - set(sn.get("flags") or []))},
        "features": features, "refusal_rate": rates, "lost_refusal_rate": lost,
        "context": _context(old, new), "probes": probes,
        "changed": bool(band["changed"] or verdict["changed"]),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_diff(diff: dict[str, Any]) -> str:
    """Return the diff as text for a terminal."""
    lines = [f"quantsafe diff {diff['old']} -> {diff['new']}",
             f"  band     {_fmt(diff['band']['old'])} -> {_fmt(diff['band']['new'])}"
             + ("  (changed)" if diff["band"]["changed"] else ""),
             f"  verdict  {_fmt(diff['verdict']['old'])} -> {_fmt(diff['verdict']['new'])}"
             + ("  (changed)" if diff["verdict"]["changed"] else ""),
             f"  RTSI     {_fmt(diff['rtsi']['old'])} -> {_fmt(diff['rtsi']['new'])}"
             + (f"  ({diff['rtsi']['delta']:+.4f})" if diff["rtsi"]["delta"] is not None else "")]
    lines.append("  feature                  delta old -> new          contribution old -> new")
    for name, f in diff["features"].items():
        lines.append(f"  {name:<24} {_fmt(f['old_delta']):>8} -> {_fmt(f['new_delta']):<8}   "
                     f"{_fmt(f['old_contribution']):>8} -> {_fmt(f['new_contribution'])}")
    for key, r in diff["refusal_rate"].items():
        lines.append(f"  {key:<32} {_fmt(r['old'], 3)} -> {_fmt(r['new'], 3)}")
    if diff["lost_refusal_rate"]["old"] is not None or diff["lost_refusal_rate"]["new"] is not None:
        lines.append(f"  lost refusals (paired)   {_fmt(diff['lost_refusal_rate']['old'], 3)} -> "
                     f"{_fmt(diff['lost_refusal_rate']['new'], 3)}")
    for name in ("added", "removed"):
        if diff["flags"][name]:
            lines.append(f"  flags {name}: {', '.join(diff['flags'][name])}")
    for c in diff["context"]:
        lines.append(f"  context: {c['key']} {_fmt(c['old'])} -> {_fmt(c['new'])}")
    probes = diff["probes"]
    if probes is None:
        lines.append("  probes: no samples.jsonl beside both records; per-probe changes not compared")
    else:
        lines.append(f"  probes: {len(probes['changed'])} of {probes['compared']} changed flip class")
        lines += [f"    {p['id']} ({p['kind']}, {p['category']}): {p['old_flip']} -> {p['new_flip']}"
                  for p in probes["changed"]]
    lines.append("same band and verdict" if not diff["changed"] else "band or verdict changed")
    return "\n".join(lines)
