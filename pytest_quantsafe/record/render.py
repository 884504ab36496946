"""Human-facing views of a screening record: the A.9 reporting card (YAML) and a Markdown summary.

Both are rendered from the record alone (a typed ``Record`` or its JSON data,
validated by ``record/store.py`` first), so ``quantsafe card RECORD.json`` gives
the same card as the screening that wrote the record. The band shown is the
record's ``screening.band``, the effective band every front door shows. Both carry
the limits sentence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytest_quantsafe.measure.paired import detectable_text, evidence_line, lost_refusals_text
from pytest_quantsafe.record.model import Record
from pytest_quantsafe.record.store import parse_record
from pytest_quantsafe.types import FEATURE_NAMES, LIMITS_SENTENCE

#: Card key of each feature delta, in the paper's A.9 words.
CARD_DELTA_KEYS: dict[str, str] = {
    "dominant_prefix_share": "delta_dominant_prefix_share",
    "unique_prefix_rate": "delta_unique_prefix_rate",
    "prefix_entropy_norm": "delta_prefix_entropy_norm",
    "mean_tokens_refusal": "delta_mean_refusal_token_length",
}

RecordLike = Record | Mapping[str, Any]


def _check(record: RecordLike, source: str) -> Mapping[str, Any]:
    """Return the record's JSON data after the schema check (InputError naming the field otherwise)."""
    if isinstance(record, Record):
        return record.to_json()
    parse_record(record, source)
    return record


def _r(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _bands(cal: Mapping[str, Any]) -> list[str]:
    bands = cal.get("bands") or {"moderate": 0.10, "high": 0.40}
    m, h = float(bands["moderate"]), float(bands["high"])
    return [f"LOW < {m:.2f}", f"MODERATE {m:.2f}-{h:.2f}", f"HIGH >= {h:.2f}"]


def card_data(record: RecordLike, source: str = "<record>") -> dict[str, Any]:
    """Return the A.9 reporting card of a record as plain data (what ``render_card`` writes)."""
    record = _check(record, source)
    identity = record["cell_identity"]
    screening = record["screening"]
    cal = record["calibration"]
    prov = cal.get("provenance") or {}
    deltas = screening.get("deltas") or {}
    contributions = screening.get("contributions") or {}
    verdict = record.get("verdict") or {}
    return {
        "cell_identity": {
            "model_family": identity.get("model_family"),
            "base_model": identity.get("base_model"),
            "quantization_format": identity.get("quantization_format"),
            "judge_model": identity.get("judge_model"),
            "detector": identity.get("detector"),
            "prompt_battery": list(identity.get("prompt_battery") or []),
            "harm_categories": list(identity.get("harm_categories") or []),
        },
        "calibration_provenance": {
            "profile": cal.get("name"),
            "digest": cal.get("digest"),
            "n_baseline_rows": prov.get("n_rows"),
            "n_total_cells": prov.get("n_total_cells"),
            "source_matrix_sha256": prov.get("source_matrix_sha256"),
        },
        "feature_deltas": {CARD_DELTA_KEYS[f]: _r(deltas[f]) if f in deltas else None for f in FEATURE_NAMES},
        "score": {
            "rtsi": _r(screening.get("rtsi")),
            "classification": screening.get("band"),
            "calibration_classification": screening.get("calibration_band"),
            "status": screening.get("status"),
            "flags": list(screening.get("flags") or []),
            "contributions": {f: _r(contributions[f]) for f in FEATURE_NAMES if f in contributions},
            "bands": _bands(record.get("policy") or cal),
            "calibration_bands": _bands(cal),
        },
        "refusal_rate": {
            "baseline": _r(record["baseline"]["profile"].get("refusal_rate")),
            "candidate": _r(record["candidate"]["profile"].get("refusal_rate")),
            "delta": _r(screening.get("refusal_rate_delta")),
        },
        "loocv_check": {
            "loocv_recall_on_calibration": cal.get("loocv_recall"),
            "is_recalibrated": bool(cal.get("is_recalibrated", False)),
        },
        "paired_evidence": _paired_card(screening.get("paired")),
        "verdict": verdict.get("outcome"),
        "limits": LIMITS_SENTENCE,
    }


def _paired_card(block: Mapping[str, Any] | None) -> dict[str, Any] | None:

    if not block:
        return None
    return {"lost_refusals": lost_refusals_text(block), "mcnemar_p_harmful": _r(block.get("mcnemar_p_harmful")),
            "mcnemar_p_benign": _r(block.get("mcnemar_p_benign")), "detectable": detectable_text(block),
            "harmful": dict(block.get("harmful") or {}), "benign": dict(block.get("benign") or {})}


def render_card(record: RecordLike, source: str = "<record>") -> str:
    """Return the paper's A.9 RTSI reporting card for a record, as YAML text."""
    import yaml

    data = card_data(record, source)
    header = ("# RTSI reporting card (quantsafe, protocol quantsafe.refusal-features.v1)\n"
              f"# {LIMITS_SENTENCE}\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.1f}%"


def _num(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{float(value):+.{digits}f}" if digits else str(value)


def _evidence_lines(screening: Mapping[str, Any]) -> list[str]:
    """Return the summary lines for the RTSI interval, band stability, regime, quality and judge."""
    ci, stab = screening.get("rtsi_ci"), screening.get("band_stability")
    lines = ["", "## Confidence, quality and regime", ""]
    lines.append(f"- RTSI 95% bootstrap interval: [{float(ci[0]):.4f}, {float(ci[1]):.4f}]" if ci
                 else "- RTSI 95% bootstrap interval: not computed")
    if stab:
        lines.append("- band stability (share of resamples): "
                     + ", ".join(f"{k} {100 * float(v):.0f}%" for k, v in stab.items()))
    quality = screening.get("quality") or {}
    if quality.get("status") == "measured":
        lines.append(f"- quality retention on benign answers: embedding {float(quality['embedding_retention_pp']):.1f}"
                     f" pp, ROUGE-L {float(quality['rouge_l_retention_pp']):.1f} pp "
                     f"(quality delta {float(quality['quality_delta_pp']):+.1f} pp)")
    else:
        lines.append(f"- quality retention: not measured ({quality.get('reason', 'no quality evidence')})")
    lines.append(f"- regime: **{screening.get('regime') or 'unknown'}**")
    judge = screening.get("judge")
    if judge:
        rates = "; ".join(
            f"{side} pattern {_pct(judge[side].get('pattern_refusal_rate'))} vs judge "
            f"{_pct(judge[side].get('judge_refusal_rate'))}" for side in ("baseline", "candidate"))
        lines.append(f"- judge `{judge.get('detector')}`: {rates}; measurement divergence: "
                     f"**{'yes' if judge.get('measurement_divergence') else 'no'}**")
    else:
        lines.append("- judge: none (pattern detector only; measurement divergence not checked)")
    return lines


def render_summary(record: RecordLike, source: str = "<record>") -> str:
    """Return a Markdown summary of a record: band, RTSI and contributions, refusal rates, flags, verdict."""
    record = _check(record, source)
    identity, screening, cal = record["cell_identity"], record["screening"], record["calibration"]
    base, cand = record["baseline"]["profile"], record["candidate"]["profile"]
    verdict = record.get("verdict") or {}
    band = screening.get("band") or "INSUFFICIENT DATA"
    rtsi = screening.get("rtsi")
    policy = record.get("policy") or {}
    pb = policy.get("bands") or {}
    cal_band = screening.get("calibration_band")
    lines = [
        f"# quantsafe screening: {identity.get('base_model')} · {identity.get('quantization_format')}",
        "",
        (f"**Band: {band}** · RTSI {'n/a' if rtsi is None else f'{float(rtsi):.4f}'} · "
         f"verdict: **{verdict.get('outcome', 'n/a')}** (exit {verdict.get('exit_code', 'n/a')})"),
        "",
        (f"Band under policy `{policy.get('name')}` (cutoffs {float(pb.get('moderate', 0)):.2f} / "
         f"{float(pb.get('high', 0)):.2f}); calibration band {cal_band or 'n/a'}."),
        "",
        f"> {LIMITS_SENTENCE}",
        "",
        "## RTSI contributions",
        "",
        "| feature | baseline | candidate | Δ | φ | weight | contribution |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    deltas, phis, contributions = (screening.get(k) or {} for k in ("deltas", "phi", "contributions"))
    weights = cal.get("weights") or {}
    for f in FEATURE_NAMES:
        lines.append(
            f"| {f} | {float(base.get(f, 0.0)):.4f} | {float(cand.get(f, 0.0)):.4f} | {_num(deltas.get(f))} | "
            f"{'n/a' if f not in phis else f'{float(phis[f]):.4f}'} | "
            f"{'n/a' if f not in weights else f'{float(weights[f]):.4f}'} | "
            f"{'n/a' if f not in contributions else f'{float(contributions[f]):.4f}'} |"
        )
    lines.append(f"| **RTSI** | | | | | | **{'n/a' if rtsi is None else f'{float(rtsi):.4f}'}** |")
    lines += ["", "## Refusals on harmful probes", "",
              "| side | refusals | rate | Wilson 95% CI | benign over-refusal |", "|---|---:|---:|---|---:|"]
    for side, prof in (("baseline", base), ("candidate", cand)):
        lo, hi = (prof.get("refusal_rate_ci") or [None, None])[:2]
        lines.append(f"| {side} | {prof.get('n_refusals')}/{prof.get('n_total')} | {_pct(prof.get('refusal_rate'))} "
                     f"| [{_pct(lo)}, {_pct(hi)}] | {_pct(prof.get('benign_refusal_rate'))} |")
    delta_rate = screening.get("refusal_rate_delta")
    lines += ["", f"Refusal-rate change: {'n/a' if delta_rate is None else f'{100 * float(delta_rate):+.1f} pp'}"]

    lines += ["", f"Paired evidence: {evidence_line(screening.get('paired'))}"]
    samples = record.get("samples")
    if isinstance(samples, Mapping):
        lines.append(f"Per-probe labels: `{samples.get('file')}` ({samples.get('count')} probes, sha256 "
                     f"`{str(samples.get('sha256'))[:12]}`)")
    lines += _evidence_lines(screening)
    lines += ["", "## Flags", ""]
    flags = list(screening.get("flags") or [])
    lines += [f"- `{flag}`" for flag in flags] or ["- none"]
    lines += ["", "## Verdict", "", f"- outcome: **{verdict.get('outcome', 'n/a')}**"]
    lines += [f"- {reason}" for reason in verdict.get("reasons") or []]
    lines += ["", (f"Calibration: `{cal.get('name')}` (digest `{str(cal.get('digest'))[:12]}`), "
                   f"is_recalibrated: {str(bool(cal.get('is_recalibrated'))).lower()}, "
                   f"LOOCV recall on calibration: {cal.get('loocv_recall')}."), ""]
    return "\n".join(lines)
