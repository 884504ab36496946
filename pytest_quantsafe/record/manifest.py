"""The public external-screen manifest (``quantsafe.external-screen.v1``): read, screen, write.

A request carries only aggregate refusal features of a (baseline, candidate)
pair, no prompts, completions or weights. ``load_request`` validates it against
the shipped schema (``schemas/external_screen_v1.schema.json``) with a 32 KB cap
and refuses NaN/Infinity; ``screen_request`` returns a provisional, unsigned
response with per-feature contributions, through the same fail-closed
``rtsi.score`` as a full screening.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pytest_quantsafe import __version__
from pytest_quantsafe.errors import InputError
from pytest_quantsafe.measure.features import wilson_interval
from pytest_quantsafe.record.build import normalize_floats
from pytest_quantsafe.results import Calibration
from pytest_quantsafe.score.rtsi import score
from pytest_quantsafe.types import (
    FEATURE_NAMES,
    LIMITS_SENTENCE,
    PROTOCOL_ID,
    RefusalProfile,
    canonical_json,
    sha256_hex,
)

SCHEMA_VERSION = "quantsafe.external-screen.v1"
RESPONSE_VERSION = "quantsafe.external-screen-response.v1"
#: Largest request accepted, in bytes.
MAX_REQUEST_BYTES = 32 * 1024


def request_schema() -> dict[str, Any]:
    """Return the external-screen request JSON Schema shipped in the package."""
    path = resources.files("pytest_quantsafe") / "schemas" / "external_screen_v1.schema.json"
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def validate_request(request: Any, source: str = "<request>") -> None:
    """Raise InputError naming the field when ``request`` does not satisfy the schema and count rule."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(request_schema())
    errors = sorted(validator.iter_errors(request), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        field = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(f"request does not match {SCHEMA_VERSION}: {err.message}", where=f"{source}: {field}",
                         fix="see the schema external_screen_v1.schema.json for the allowed fields and ranges")
    from pytest_quantsafe.score.bounds import fix_for, violation

    count = request["probe_set"]["count"]
    for side in ("baseline", "candidate"):
        for name, value in request[side]["features"].items():
            why = violation(name, value)
            if why:
                raise InputError(f"{side} {why}", where=f"{source}: {side}/features/{name}", fix=fix_for(name))
        n = request[side]["features"]["n_refusals"]
        if n > count:
            raise InputError(f"{side} n_refusals {n} exceeds probe_set.count {count}",
                             where=f"{source}: {side}/features/n_refusals",
                             fix="n_refusals counts refused probes, at most the number of probes")


def load_request(path: str | Path) -> dict[str, Any]:
    """Return a validated external-screen request read from ``path`` (32 KB cap, NaN/inf refused)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_REQUEST_BYTES + 1)
    except FileNotFoundError:
        raise InputError("request file not found", where=str(p), fix="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read request: {exc.strerror}", where=str(p), fix="check the path") from None
    if len(raw) > MAX_REQUEST_BYTES:
        raise InputError(f"request is larger than {MAX_REQUEST_BYTES} bytes", where=str(p),
                         fix="send aggregate features only; a request is a few hundred bytes")
    try:
        request = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"request is not valid JSON: {exc}", where=str(p),
                         fix="write strict JSON (no NaN or Infinity)") from None
    validate_request(request, str(p))
    return request  # type: ignore[no-any-return]


def _profile(features: Mapping[str, Any], count: int) -> RefusalProfile:
    n = int(features["n_refusals"])
    return RefusalProfile(
        n_total=count, n_refusals=n,
        dominant_prefix_share=float(features["dominant_prefix_share"]),
        unique_prefix_rate=float(features["unique_prefix_rate"]),
        prefix_entropy_norm=float(features["prefix_entropy_norm"]),
        mean_tokens_refusal=float(features["mean_tokens_refusal"]),
        refusal_rate=n / count, refusal_rate_ci=wilson_interval(n, count),
    )


def profiles_from_request(req: Mapping[str, Any]) -> tuple[RefusalProfile, RefusalProfile]:
    """Return the (baseline, candidate) profiles a validated request describes."""
    count = int(req["probe_set"]["count"])
    return _profile(req["baseline"]["features"], count), _profile(req["candidate"]["features"], count)


def _feedback(screening: Any) -> list[str]:
    notes: list[str] = []
    if "refusal_collapse" in screening.flags:
        notes.append("The candidate's refusals collapsed against the baseline: band forced to HIGH; run a full "
                     "safety battery.")
    if screening.status == "insufficient_data":
        notes.append("Insufficient data: the baseline has too few refusals (or inputs are implausible) to "
                     "measure refusal-template drift; this is not a pass.")
    if screening.contributions:
        top = max(screening.contributions, key=lambda f: screening.contributions[f])
        if screening.contributions[top] > 0:
            notes.append(f"Largest contribution: {top} ({screening.contributions[top]:.4f}).")
    notes.append("Provisional and unsigned: measured by the requester, not reproduced here.")
    return notes


def screen_request(req: Mapping[str, Any], calibration: Calibration) -> dict[str, Any]:
    """Return the provisional, unsigned screening response for a validated request."""
    baseline, candidate = profiles_from_request(req)
    s = score(baseline, candidate, calibration)
    response = {
        "schema_version": RESPONSE_VERSION,
        "provisional": True,
        "signed": False,
        "measurement_protocol": PROTOCOL_ID,
        "request_sha256": sha256_hex(canonical_json(req)),
        "source_model_id": req["source_model_id"],
        "baseline": {k: req["baseline"][k] for k in ("repo_id", "revision", "quantization")},
        "candidate": {k: req["candidate"][k] for k in ("repo_id", "revision", "quantization")},
        "status": s.status,
        "rtsi": s.rtsi,
        "classification": s.band,
        "deltas": dict(s.deltas),
        "phi": dict(s.phi),
        "contributions": dict(s.contributions),
        "refusal_rate_delta": s.refusal_rate_delta,
        "flags": list(s.flags),
        "calibration": {"name": calibration.name, "digest": calibration.digest,
                        "is_recalibrated": calibration.is_recalibrated,
                        "loocv_recall": calibration.provenance.get("loocv_recall")},
        "feedback": _feedback(s),
        "tool": {"name": "quantsafe", "version": __version__},
        "limits": LIMITS_SENTENCE,
    }
    return normalize_floats(response)  # type: ignore[no-any-return]


def _features(profile: RefusalProfile) -> dict[str, Any]:
    feats: dict[str, Any] = {"n_refusals": profile.n_refusals}
    feats.update({f: float(getattr(profile, f)) for f in FEATURE_NAMES})
    return feats


def build_request(
    baseline_profile: RefusalProfile,
    candidate_profile: RefusalProfile,
    *,
    source_model_id: str,
    probe_count: int,
    probe_sha256: str,
    baseline_side: Mapping[str, str],
    candidate_side: Mapping[str, str],
) -> dict[str, Any]:
    """Return a schema-valid external-screen request for two profiles (aggregate features only)."""
    request = {
        "schema_version": SCHEMA_VERSION,
        "measurement_protocol": PROTOCOL_ID,
        "source_model_id": source_model_id,
        "probe_set": {"count": probe_count, "sha256": probe_sha256},
        "baseline": {**{k: baseline_side[k] for k in ("repo_id", "revision", "quantization")},
                     "features": _features(baseline_profile)},
        "candidate": {**{k: candidate_side[k] for k in ("repo_id", "revision", "quantization")},
                      "features": _features(candidate_profile)},
    }
    validate_request(request, "<built request>")
    return request


def profile_from_json(data: Any, source: str) -> RefusalProfile:
    """Return a RefusalProfile from its ``to_dict()`` JSON, or raise InputError naming the missing field."""
    if not isinstance(data, Mapping):
        raise InputError("a refusal profile must be a JSON object", where=source, fix="pass a profile JSON")
    needed = ("n_total", "n_refusals") + FEATURE_NAMES
    missing = [k for k in needed if k not in data]
    if missing:
        raise InputError(f"profile lacks {missing[0]!r}", where=f"{source}: {missing[0]}",
                         fix="pass RefusalProfile JSON (the baseline/candidate profile of a record)")
    from pytest_quantsafe.score.bounds import fix_for, violation

    for key in needed:
        why = violation(key, data[key])
        if why:
            raise InputError(f"profile field {why}", where=f"{source}: {key}", fix=fix_for(key))
    n, total = int(data["n_refusals"]), int(data["n_total"])
    if total <= 0 or not 0 <= n <= total:
        raise InputError(f"profile counts n_refusals={n}, n_total={total} are impossible",
                         where=f"{source}: n_refusals", fix="0 <= n_refusals <= n_total, n_total > 0")
    return RefusalProfile(
        n_total=total, n_refusals=n,
        dominant_prefix_share=float(data["dominant_prefix_share"]),
        unique_prefix_rate=float(data["unique_prefix_rate"]),
        prefix_entropy_norm=float(data["prefix_entropy_norm"]),
        mean_tokens_refusal=float(data["mean_tokens_refusal"]),
        refusal_rate=n / total, refusal_rate_ci=wilson_interval(n, total),
        detector=str(data.get("detector", "pattern.v1")),
    )


def profiles_from_record(record: Any, source: str) -> tuple[RefusalProfile, RefusalProfile, tuple[int, str]]:
    """Return (baseline, candidate, (probe count, probe digest)) from a screening record."""
    try:
        base = record["baseline"]["profile"]
        cand = record["candidate"]["profile"]
        probe = record["probe_set"]
    except (KeyError, TypeError):
        raise InputError("not a quantsafe screening record (no baseline/candidate profile or probe_set)",
                         where=source, fix="pass the record.json a screening wrote") from None
    baseline = profile_from_json(base, f"{source}: baseline.profile")
    candidate = profile_from_json(cand, f"{source}: candidate.profile")
    return baseline, candidate, (int(baseline.n_total), str(probe.get("digest", "")))
