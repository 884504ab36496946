"""Internal consistency of a screening record, checked before signing and after verifying.

A signature only proves who signed which bytes. This module checks that those
bytes say something coherent: the calibration band matches RTSI under the
calibration's cutoffs (``refusal_collapse`` forcing HIGH), the contributions sum
to RTSI, signed decimal thresholds equal the record's numbers, and the effective
band and the verdict are what ``policy.effective_band`` and ``policy.decide`` give
on the recorded screening and policy. An inconsistency is ``VerificationFailed``
(exit 4); a malformed record (missing field, wrong type, NaN) is ``InputError``
(exit 2) from ``record/store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from pytest_quantsafe.attest.sign import thresholds
from pytest_quantsafe.errors import OUTCOME_EXIT, VerificationFailed
from pytest_quantsafe.policy import decide, effective_band
from pytest_quantsafe.record.model import BandCutoffs, Record
from pytest_quantsafe.record.store import parse_record
from pytest_quantsafe.results import Bands
from pytest_quantsafe.types import LIMITS_SENTENCE

__all__ = ["check_record", "fail_verification", "typed_record"]


def fail_verification(message: str, where: str,
                      fix: str = "do not release on this attestation; re-screen and re-sign") -> VerificationFailed:
    """Return the VerificationFailed to raise for a record or statement that does not hold."""
    return VerificationFailed(message, where=where, fix=fix)


def typed_record(record: Any, where: str) -> Record:
    """Return the typed record of a record or predicate (its ``thresholds`` aside).

    A malformed record (missing field, wrong type, NaN) is an InputError (exit 2) naming the field.
    """
    if isinstance(record, Record):
        return record
    if not isinstance(record, Mapping):
        raise fail_verification("the predicate is not a JSON object", where)
    return parse_record({k: v for k, v in record.items() if k != "thresholds"}, where)


def _bands(cutoffs: BandCutoffs, path: str) -> Bands:
    if not 0.0 <= cutoffs.moderate < cutoffs.high <= 1.0:
        raise fail_verification(f"band cutoffs {cutoffs.moderate} / {cutoffs.high} are not 0 <= moderate < high <= 1",
                                path)
    return Bands(cutoffs.moderate, cutoffs.high)


def check_record(record: Any, where: str = "predicate", *, signed_thresholds: bool = False) -> None:
    """Return None when the record is internally consistent; raise VerificationFailed otherwise.

    The band and the verdict are decided again by ``policy.py`` on the record's own
    screening and policy and must equal what the record says: nothing decides twice.
    With ``signed_thresholds`` (a predicate, not a bare record) the decimal-string
    ``thresholds`` block must be present and agree with the record's numbers.
    """
    typed = typed_record(record, where)
    data = typed.to_json()
    if typed.limits != LIMITS_SENTENCE:
        raise fail_verification("the record does not carry the limits sentence", f"{where}.limits")
    calibration_bands = _bands(typed.calibration.bands, f"{where}.calibration.bands")
    _bands(typed.policy.bands, f"{where}.policy.bands")

    # The signed thresholds must say what the record says.
    signed = record.get("thresholds") if isinstance(record, Mapping) else None
    if signed is None and signed_thresholds:
        raise fail_verification("the predicate carries no signed thresholds", f"{where}.thresholds")
    if signed is not None:
        if not isinstance(signed, Mapping):
            raise fail_verification("thresholds is not an object", f"{where}.thresholds")
        for key, value in thresholds(data).items():
            got = signed.get(key)
            if not _same_decimal(got, value):
                raise fail_verification(f"signed threshold {key}={got!r} disagrees with the record ({value!r})",
                                        f"{where}.thresholds.{key}")

    s = typed.screening
    got = typed.verdict
    if got.exit_code != OUTCOME_EXIT[got.outcome]:
        raise fail_verification(f"verdict {got.outcome!r} with exit code {got.exit_code!r} is not a valid verdict "
                                f"(expected exit {OUTCOME_EXIT[got.outcome]})", f"{where}.verdict.exit_code")
    if s.status == "scored" and (s.rtsi is None or s.band is None or s.calibration_band is None):
        raise fail_verification("a scored screening without an RTSI or band", f"{where}.screening")
    if s.status == "insufficient_data" and not (s.rtsi is None and s.band is None and s.calibration_band is None):
        raise fail_verification("insufficient data but an RTSI or band is claimed", f"{where}.screening")
    if s.status == "scored":
        assert s.rtsi is not None  # Record.from_json refuses a scored screening without one
        score = float(s.rtsi)
        if not 0.0 <= score <= 1.0 + 1e-9:
            raise fail_verification(f"RTSI {score} is outside [0, 1]", f"{where}.screening.rtsi")
        collapse = "refusal_collapse" in s.flags
        # The scorer's rule (score/rtsi.py): the calibration's cutoffs, HIGH on refusal collapse.
        want = "HIGH" if collapse else calibration_bands.classify(score)
        if s.calibration_band != want:
            raise fail_verification(f"calibration band {s.calibration_band!r} does not match RTSI {score} under bands "
                                    f"{calibration_bands.moderate}/{calibration_bands.high}"
                                    f"{' with refusal_collapse' if collapse else ''} (expected {want})",
                                    f"{where}.screening.calibration_band")
        if s.contributions:
            total = sum(float(v) for v in s.contributions.values())
            if abs(total - score) > 1e-6:
                raise fail_verification(f"contributions sum to {total}, not RTSI {score}",
                                        f"{where}.screening.contributions")

    screening, policy = typed.screening_value(), typed.policy_value()
    band = effective_band(screening, policy)
    if s.band != band:
        raise fail_verification(f"band {s.band!r} is not the effective band {band!r} of RTSI {s.rtsi} under the "
                                f"policy's bands {policy.bands.moderate}/{policy.bands.high}",
                                f"{where}.screening.band")
    verdict = decide(screening, policy)
    if got.outcome != verdict.outcome:
        raise fail_verification(f"verdict {got.outcome!r}, but the recorded policy {policy.name!r} decides "
                                f"{verdict.outcome!r} on the recorded screening ({'; '.join(verdict.reasons)})",
                                f"{where}.verdict.outcome")


def _same_decimal(got: Any, want: str | None) -> bool:
    if want is None or got is None:
        return got is want
    if not isinstance(got, str):
        return False
    try:
        return Decimal(got) == Decimal(want)
    except InvalidOperation:
        return got == want
