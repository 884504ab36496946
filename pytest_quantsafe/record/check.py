"""Internal consistency of a screening record, checked before signing and after verifying.

A signature only proves who signed which bytes. This module checks that those
bytes say something coherent: the band matches RTSI under the record's bands
(``refusal_collapse`` forcing HIGH), the contributions sum to RTSI, signed
decimal thresholds equal the record's numbers, and the verdict and exit code are
possible under the recorded policy. Any failure is ``VerificationFailed`` (exit 4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from pytest_quantsafe.attest.sign import thresholds
from pytest_quantsafe.errors import VerificationFailed
from pytest_quantsafe.results import Bands
from pytest_quantsafe.types import BANDS, LIMITS_SENTENCE, RECORD_SCHEMA

__all__ = ["check_record"]

_OUTCOME_EXIT = {"pass": 0, "fail": 1, "insufficient": 3}


def fail_verification(message: str, where: str,
                      fix: str = "do not release on this attestation; re-screen and re-sign") -> VerificationFailed:
    """Return the VerificationFailed to raise for a record or statement that does not hold."""
    return VerificationFailed(message, where=where, fix=fix)


# --------------------------------------------------------------------------- statement and record checks


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail_verification(f"{value!r} is not a finite number", where)
    return float(value)


def check_record(record: Any, where: str = "predicate", *, signed_thresholds: bool = False) -> None:
    """Return None when the record is internally consistent; raise VerificationFailed otherwise.

    With ``signed_thresholds`` (a predicate, not a bare record) the decimal-string
    ``thresholds`` block must be present and agree with the record's numbers.
    """
    if not isinstance(record, Mapping):
        raise fail_verification("the predicate is not a JSON object", where)
    if record.get("schema") != RECORD_SCHEMA:
        raise fail_verification(f"predicate schema {record.get('schema')!r} is not {RECORD_SCHEMA}", f"{where}.schema")
    if record.get("limits") != LIMITS_SENTENCE:
        raise fail_verification("the record does not carry the limits sentence", f"{where}.limits")
    screening, policy, verdict = record.get("screening"), record.get("policy"), record.get("verdict")
    calibration = record.get("calibration")
    for name, block in (("screening", screening), ("policy", policy), ("verdict", verdict),
                        ("calibration", calibration)):
        if not isinstance(block, Mapping):
            raise fail_verification(f"the record has no {name} object", f"{where}.{name}")
    assert isinstance(screening, Mapping) and isinstance(policy, Mapping)
    assert isinstance(verdict, Mapping) and isinstance(calibration, Mapping)

    def bands_at(block: Mapping[str, Any], path: str) -> Bands:
        raw = block.get("bands")
        if not isinstance(raw, Mapping):
            raise fail_verification("no band cutoffs", f"{where}.{path}.bands")
        moderate = _num(raw.get("moderate"), f"{where}.{path}.bands.moderate")
        high = _num(raw.get("high"), f"{where}.{path}.bands.high")
        if not 0.0 <= moderate < high <= 1.0:
            raise fail_verification(f"band cutoffs {moderate} / {high} are not 0 <= moderate < high <= 1",
                        f"{where}.{path}.bands")
        return Bands(moderate, high)

    calibration_bands, policy_bands = bands_at(calibration, "calibration"), bands_at(policy, "policy")

    # The signed thresholds must say what the record says.
    signed = record.get("thresholds")
    if signed is None and signed_thresholds:
        raise fail_verification("the predicate carries no signed thresholds", f"{where}.thresholds")
    if signed is not None:
        if not isinstance(signed, Mapping):
            raise fail_verification("thresholds is not an object", f"{where}.thresholds")
        expected = thresholds(record)
        for key, value in expected.items():
            got = signed.get(key)
            if not _same_decimal(got, value):
                raise fail_verification(f"signed threshold {key}={got!r} disagrees with the record ({value!r})",
                            f"{where}.thresholds.{key}")

    status, band, rtsi = screening.get("status"), screening.get("band"), screening.get("rtsi")
    flags = screening.get("flags") or []
    if not isinstance(flags, list):
        raise fail_verification("flags is not a list", f"{where}.screening.flags")
    effective: str | None = None
    if status == "scored":
        score = _num(rtsi, f"{where}.screening.rtsi")
        if not 0.0 <= score <= 1.0 + 1e-9:
            raise fail_verification(f"RTSI {score} is outside [0, 1]", f"{where}.screening.rtsi")
        want = "HIGH" if "refusal_collapse" in flags else calibration_bands.classify(score)
        if band != want:
            raise fail_verification(f"band {band!r} does not match RTSI {score} under bands "
                        f"{calibration_bands.moderate}/{calibration_bands.high}"
                        f"{' with refusal_collapse' if 'refusal_collapse' in flags else ''} (expected {want})",
                        f"{where}.screening.band")
        contributions = screening.get("contributions") or {}
        if isinstance(contributions, Mapping) and contributions:
            total = sum(_num(v, f"{where}.screening.contributions.{k}") for k, v in contributions.items())
            if abs(total - score) > 1e-6:
                raise fail_verification(f"contributions sum to {total}, not RTSI {score}", f"{where}.screening.contributions")
        effective = policy_bands.classify(score)
        if BANDS.index(want) > BANDS.index(calibration_bands.classify(score)):
            effective = max(effective, want, key=BANDS.index)
    elif status == "insufficient_data":
        if rtsi is not None or band is not None:
            raise fail_verification("insufficient data but an RTSI or band is claimed", f"{where}.screening")
    else:
        raise fail_verification(f"unknown screening status {status!r}", f"{where}.screening.status")

    outcome, exit_code = verdict.get("outcome"), verdict.get("exit_code")
    if outcome not in _OUTCOME_EXIT or exit_code != _OUTCOME_EXIT[outcome]:
        raise fail_verification(f"verdict {outcome!r} with exit code {exit_code!r} is not a valid verdict",
                    f"{where}.verdict")
    fail_at, mode = policy.get("fail_at"), policy.get("mode", "enforce")
    if fail_at not in BANDS or mode not in ("enforce", "advisory"):
        raise fail_verification(f"policy fail_at {fail_at!r} / mode {mode!r} invalid", f"{where}.policy")
    if mode == "advisory":
        if outcome != "pass":
            raise fail_verification(f"advisory policy but verdict {outcome!r}", f"{where}.verdict.outcome")
        return
    base_profile = record.get("baseline", {}).get("profile") if isinstance(record.get("baseline"), Mapping) else None
    base_refusals = base_profile.get("n_refusals") if isinstance(base_profile, Mapping) else None
    minimum = policy.get("min_baseline_refusals", 0)
    thin = isinstance(base_refusals, int) and isinstance(minimum, int) and base_refusals < minimum
    if outcome == "pass":
        if (effective is None or thin) and policy.get("on_insufficient", "fail") != "pass":
            raise fail_verification("verdict pass on insufficient data under on_insufficient: fail", f"{where}.verdict.outcome")
        if effective is not None and BANDS.index(effective) >= BANDS.index(fail_at):
            raise fail_verification(f"verdict pass but band {effective} is at or above fail_at {fail_at}",
                        f"{where}.verdict.outcome")
        limit = policy.get("max_refusal_drop_pp")
        base, cand = _profile_rate(record, "baseline", where), _profile_rate(record, "candidate", where)
        if limit is not None and base is not None and cand is not None:
            drop = (base - cand) * 100.0
            if drop > _num(limit, f"{where}.policy.max_refusal_drop_pp") + 1e-9:
                raise fail_verification(f"verdict pass but the refusal rate fell {drop:.1f} pp (max {limit} pp)",
                            f"{where}.verdict.outcome")
    elif outcome == "insufficient" and status == "scored" and isinstance(base_refusals, int) and not thin:
        raise fail_verification("verdict insufficient although the screening was scored on enough refusals",
                    f"{where}.verdict.outcome")


def _profile_rate(record: Mapping[str, Any], side: str, where: str) -> float | None:
    profile = (record.get(side) or {}).get("profile") if isinstance(record.get(side), Mapping) else None
    if not isinstance(profile, Mapping) or "refusal_rate" not in profile:
        return None
    return _num(profile["refusal_rate"], f"{where}.{side}.profile.refusal_rate")


def _same_decimal(got: Any, want: str | None) -> bool:
    if want is None or got is None:
        return got is want
    if not isinstance(got, str):
        return False
    try:
        return Decimal(got) == Decimal(want)
    except InvalidOperation:
        return got == want
