"""The screening record (``quantsafe.record.v2``, docs/record-format.md) and its output files.

The record is plain JSON data built from the stage values and validated against
the shipped schema before it leaves ``build_record`` (``store.parse_record``).
``screening.band`` is the effective band, decided once by ``policy.effective_band``;
``screening.calibration_band`` is the scorer's band beside it. Floats are rounded to
``FLOAT_DIGITS`` decimals so two runs on the same inputs give byte-identical
records (timestamps aside); ``body_digest`` hashes the canonical JSON without
``created``. The reporting card and the Markdown summary are rendered from the
record alone (``render.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pytest_quantsafe import __version__
from pytest_quantsafe._util import write_atomic
from pytest_quantsafe.errors import InputError
from pytest_quantsafe.policy import effective_band
from pytest_quantsafe.record.render import render_card, render_summary
from pytest_quantsafe.record.store import parse_record, record_json, write_record
from pytest_quantsafe.results import Calibration, Policy, Screening, Verdict
from pytest_quantsafe.types import (
    LIMITS_SENTENCE,
    PROTOCOL_ID,
    RECORD_SCHEMA,
    Artifact,
    GenerationConfig,
    ProbeSet,
    canonical_json,
    sha256_hex,
)

__all__ = ["FLOAT_DIGITS", "body_digest", "build_record", "calibration_block", "normalize_floats",
           "record_json", "render_card", "render_summary", "screening_block", "utc_now", "write_outputs"]

#: Decimal places every float in a record is rounded to.
FLOAT_DIGITS = 12

#: Output file names by kind.
OUTPUT_FILES: dict[str, str] = {"record": "record.json", "card": "card.yaml", "summary": "summary.md",
                                "samples": "samples.jsonl"}


def samples_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return ``samples.jsonl``: one canonical JSON object per probe (sorted keys), newline-terminated."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


def samples_block(text: str, *, completions: bool) -> dict[str, Any]:
    """Return the record's ``samples`` entry: file name, sha256 of its bytes, row count, whether texts are kept."""
    return {"file": OUTPUT_FILES["samples"], "sha256": sha256_hex(text.encode("utf-8")),
            "count": text.count("\n"), "completions": completions}


def normalize_floats(value: Any, digits: int = FLOAT_DIGITS) -> Any:
    """Return ``value`` as plain JSON data with floats rounded to ``digits`` (tuples become lists)."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"a record cannot hold the non-finite number {value!r}",
                             fix="non-finite inputs must be flagged before a record is built")
        rounded = round(value, digits)
        return 0.0 if rounded == 0 else rounded
    if isinstance(value, Mapping):
        return {str(k): normalize_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize_floats(v, digits) for v in value]
    raise TypeError(f"cannot put {type(value).__name__} into a record")


def utc_now() -> str:
    """Return the current UTC time as an ISO 8601 string with a trailing Z (seconds precision)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def calibration_block(calibration: Calibration) -> dict[str, Any]:
    """Return the record's ``calibration`` section for a profile."""
    return {
        "name": calibration.name,
        "digest": calibration.digest,
        "protocol": calibration.protocol,
        "detector": calibration.detector,
        "is_recalibrated": calibration.is_recalibrated,
        "loocv_recall": calibration.provenance.get("loocv_recall"),
        "weights": dict(calibration.to_dict()["weights"]),
        "ranges": dict(calibration.to_dict()["ranges"]),
        "bands": {"moderate": calibration.bands.moderate, "high": calibration.bands.high},
        "provenance": dict(calibration.provenance),
    }


def _cell_identity(baseline: Artifact, candidate: Artifact, probe_set: ProbeSet,
                   screening: Screening) -> dict[str, Any]:
    meta_c, meta_b = candidate.metadata, baseline.metadata
    family = (meta_c.get("architecture") or meta_c.get("family") or meta_b.get("architecture")
              or meta_b.get("family"))
    judge = screening.judge or {}
    return {
        "model_family": family,
        "base_model": meta_c.get("base_model") or meta_b.get("base_model") or candidate.name,
        "quantization_format": candidate.quantization,
        "detector": screening.candidate.detector,
        "judge_model": judge.get("model") or judge.get("judge_model"),
        "prompt_battery": [probe_set.name],
        "harm_categories": list(probe_set.categories),
    }


def screening_block(screening: Screening, policy: Policy) -> dict[str, Any]:
    """Return the record's ``screening`` section: ``band`` is the effective band, the scorer's beside it."""
    block = screening.to_dict()
    block["calibration_band"] = screening.band
    block["band"] = effective_band(screening, policy)
    return block


def build_record(
    *,
    baseline: Artifact,
    candidate: Artifact,
    probe_set: ProbeSet,
    generation: GenerationConfig,
    engine: Mapping[str, str],
    screening: Screening,
    policy: Policy,
    verdict: Verdict,
    calibration: Calibration,
    created: str | None = None,
    samples: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the screening record (docs/record-format.md) as plain JSON data with rounded floats.

    The record is validated against the shipped schema before it is returned. ``samples``
    (``samples_block``) names the per-probe file and its digest, so a signature over the record
    covers the file. ``cache`` is the completion-cache provenance of a model screening (how
    many completions were read from the cache, whether it was read at all); external evidence
    says it read none.
    """
    record: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "tool": {"name": "quantsafe", "version": __version__},
        "created": created or utc_now(),
        "protocol": PROTOCOL_ID,
        "cell_identity": _cell_identity(baseline, candidate, probe_set, screening),
        "probe_set": {
            "name": probe_set.name,
            "digest": probe_set.digest,
            "count": len(probe_set.items),
            "n_harmful": len(probe_set.harmful),
            "n_benign": len(probe_set.benign),
        },
        "engine": dict(sorted(engine.items())),
        "generation": generation.to_dict(),
        "baseline": {"artifact": baseline.to_dict(), "profile": screening.baseline.to_dict()},
        "candidate": {"artifact": candidate.to_dict(), "profile": screening.candidate.to_dict()},
        "screening": screening_block(screening, policy),
        "calibration": calibration_block(calibration),
        "policy": policy.to_dict(),
        "verdict": verdict.to_dict(),
        "limits": LIMITS_SENTENCE,
    }
    record["samples"] = dict(samples) if samples is not None else None
    # External evidence reads no completion cache and generates nothing here: say so too.
    record["cache"] = dict(cache) if cache is not None else {
        "read": False, "baseline_from_cache": 0, "candidate_from_cache": 0, "generated": 0,
        "authentication": None, "dropped_corrupt": None, "dropped_unauthenticated": None}
    data: dict[str, Any] = normalize_floats(record)
    parse_record(data, f"record of {candidate.ref}")  # every record the suite writes matches the schema
    return data


#: Keys that say when and how a record was made, not what was measured: left out of the body digest,
#: so a rerun that reads its completions from the cache has the body of the run that generated them.
RUN_KEYS = frozenset({"created", "cache"})


def body_digest(record: Mapping[str, Any]) -> str:
    """Return the SHA-256 of the record's canonical JSON without ``created`` and ``cache`` (``RUN_KEYS``)."""
    body = {k: v for k, v in record.items() if k not in RUN_KEYS}
    return sha256_hex(canonical_json(body))


def write_outputs(record: Mapping[str, Any], out_dir: Path, samples: str | None = None) -> dict[str, str]:
    """Return the paths written: record.json, card.yaml, summary.md and (given) samples.jsonl under ``out_dir``."""
    out = Path(out_dir)
    block = record.get("samples")
    if (samples is None) != (block is None) or (
            samples is not None and isinstance(block, Mapping) and block.get("sha256") != sha256_hex(
                samples.encode("utf-8"))):
        raise InputError("the samples text does not match the record's samples digest", where=str(out),
                         fix="build the record with samples_block(samples_text(rows))")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"record": str(write_record(record, out / OUTPUT_FILES["record"]))}
        texts = {"card": render_card(record), "summary": render_summary(record)}
        if samples is not None:
            texts["samples"] = samples
        for kind, text in texts.items():
            path = out / OUTPUT_FILES[kind]
            write_atomic(path, text)
            paths[kind] = str(path)
    except OSError as exc:
        raise InputError(f"cannot write the screening outputs: {exc.strerror or exc}", where=str(out),
                         fix="choose a writable output folder") from None
    return paths
