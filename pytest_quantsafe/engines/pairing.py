"""Matched-pair checks: a candidate is only scored against a full-precision variant of the same base model.

RTSI compares the refusal shape of a quantized candidate with its own full-precision
baseline. A pair from different model families (another architecture, another
vocabulary, another tokenizer) is not a drift measurement at all; the paper's A.11
case shows what happens when such a comparison is scored anyway. Such pairs are
refused with ``CategoryMismatchError`` (exit code 2) before any generation.

Two more checks keep the baseline honest (docs/architecture.md "Honest baselines"):
``check_distinct`` refuses a candidate with the baseline's own content digest (a
model screened against itself measures nothing), and ``baseline_precision_problem``
says why a baseline is not full precision, from what the artifact itself holds: a
GGUF's own tensor types, an HF checkpoint's ``quantization_config``, or for an
endpoint the ``baseline_precision`` engine option.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pytest_quantsafe.engines.llamacpp.gguf_metadata import read_gguf
from pytest_quantsafe.errors import BaselineError, CategoryMismatchError
from pytest_quantsafe.types import Artifact

#: GGUF tensor types of an unquantized model (1-D norms are F32 in every file; matrices must be too).
FULL_PRECISION_TYPES = frozenset({"F64", "F32", "F16", "BF16"})
#: What the ``baseline_precision`` engine option may say for a full-precision endpoint.
FULL_PRECISION_NAMES = frozenset({"F32", "FP32", "FLOAT32", "F16", "FP16", "FLOAT16", "BF16", "BFLOAT16"})
#: Engine option stating an endpoint baseline's precision (nothing else can be inspected).
PRECISION_OPTION = "baseline_precision"

#: Artifact metadata keys that identify the base model family, with what each means.
#: Engines write them (as plain strings) when they resolve an artifact.
IDENTITY_KEYS: Mapping[str, str] = {
    "architecture": "model architecture",
    "vocab_sha256": "vocabulary (token list digest)",
    "vocab_size": "vocabulary size",
    "tokenizer_model": "tokenizer model",
}


def identity(artifact: Artifact) -> dict[str, str]:
    """Return the identity fields an artifact's engine reported (the keys of ``IDENTITY_KEYS`` it has)."""
    return {key: str(artifact.metadata[key]) for key in IDENTITY_KEYS if artifact.metadata.get(key)}


def check_matched_pair(baseline: Artifact, candidate: Artifact) -> None:
    """Return None when the two artifacts are two variants of one base model; raise otherwise.

    One model twice (the same content digest) is refused first (``check_distinct``).

    Every identity field present on both sides must be equal. Fields are only
    comparable within one artifact format (a GGUF architecture name and a
    transformers class name are spelled differently), so across formats only the
    vocabulary size is compared.
    """
    check_distinct(baseline, candidate)
    base_id, cand_id = identity(baseline), identity(candidate)
    keys = [k for k in IDENTITY_KEYS if k in base_id and k in cand_id]
    if baseline.format != candidate.format:
        keys = [k for k in keys if k == "vocab_size"]
    differing = [k for k in keys if base_id[k] != cand_id[k]]
    if not differing:
        return
    details = "; ".join(
        f"{IDENTITY_KEYS[k]}: baseline {base_id[k][:24]!r} vs candidate {cand_id[k][:24]!r}" for k in differing
    )
    raise CategoryMismatchError(
        f"{candidate.name} is not a variant of {baseline.name}: {details}. Scoring a pair from different "
        "model families is a category mismatch (paper A.11), not a refusal-drift measurement",
        where=f"baseline {baseline.ref} / candidate {candidate.ref}",
        fix="screen each quantized candidate against the full-precision checkpoint it was made from",
    )


def check_distinct(baseline: Artifact, candidate: Artifact) -> None:
    """Return None when the candidate is not the baseline itself (same content digest); raise BaselineError."""
    if baseline.digest == candidate.digest:
        raise BaselineError(
            f"{candidate.ref} has the baseline's own content digest ({baseline.digest[:16]}...): a model screened "
            "against itself (the same model twice) measures nothing and would pass", where=f"baseline {baseline.ref} / candidate "
            f"{candidate.ref}", fix="screen the quantized candidate against the full-precision model it was made from")


def _gguf_tensor_types(artifact: Artifact) -> dict[str, int]:
    raw = artifact.metadata.get("tensor_types", "")
    if not raw and artifact.format == "hf" and artifact.files:
        raw = read_gguf(Path(artifact.files[0].path)).tensor_types
    counts: dict[str, int] = {}
    for item in str(raw).split(","):
        name, _, count = item.partition(":")
        if name:
            counts[name] = int(count or 0)
    return counts


def baseline_precision_problem(baseline: Artifact, stated: str | None = None) -> str | None:
    """Return None when the baseline is full precision, else a sentence saying why it is not (or is unknown)."""
    if baseline.format == "gguf" or (baseline.format == "hf" and baseline.metadata.get("gguf_file")):
        counts = _gguf_tensor_types(baseline)
        if not counts:
            return "its GGUF tensor types are unknown"
        quantized = {t: n for t, n in counts.items() if t not in FULL_PRECISION_TYPES}
        if quantized:
            listed = ", ".join(f"{t} x{n}" for t, n in sorted(quantized.items(), key=lambda kv: -kv[1]))
            return f"its GGUF weight tensors are quantized ({listed}; file type {baseline.quantization})"
        return None
    if baseline.format == "hf":
        method = baseline.metadata.get("quant_method")
        return f"its config.json has a quantization_config ({method})" if method else None
    if stated is None:
        return (f"a {baseline.format} baseline cannot be inspected, and no {PRECISION_OPTION} engine option "
                "states its precision")
    if stated.strip().upper() not in FULL_PRECISION_NAMES:
        return f"its stated {PRECISION_OPTION} {stated!r} is not full precision"
    return None


def quantized_baseline_error(baseline: Artifact, problem: str) -> BaselineError:
    """Return the exit-2 error for a baseline that is not full precision."""
    return BaselineError(
        f"the baseline {baseline.name} is not full precision: {problem}. Drift measured against a quantized "
        "baseline understates what quantization did", where=f"baseline {baseline.ref}",
        fix="screen against the F32/F16/BF16 checkpoint the candidate was quantized from; for an endpoint, state "
        f"it with the engine option {PRECISION_OPTION}=bf16 (or fp16/fp32); or, knowingly, set "
        "allow_quantized_baseline: true in the policy (the record is flagged quantized_baseline)")
