"""Matched-pair check: a candidate is only scored against a variant of the same base model.

RTSI compares the refusal shape of a quantized candidate with its own full-precision
baseline. A pair from different model families (another architecture, another
vocabulary, another tokenizer) is not a drift measurement at all; the paper's A.11
case shows what happens when such a comparison is scored anyway. Such pairs are
refused with ``CategoryMismatchError`` (exit code 2) before any generation. So is a
"pair" that is one file twice (same content digest): it measures nothing and would
always pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from pytest_quantsafe.errors import CategoryMismatchError, InputError
from pytest_quantsafe.types import Artifact

#: Artifact metadata keys that identify the base model family, with what each means.
#: Engines write them (as plain strings) when they resolve an artifact.
IDENTITY_KEYS: Mapping[str, str] = {
    "architecture": "model architecture",
    "vocab_sha256": "vocabulary (token list digest)",
    "vocab_size": "vocabulary size",
    "tokenizer_model": "tokenizer model",
}


#: Artifact formats whose digests quantsafe computes from the files themselves.
MEASURED_FORMATS = frozenset({"gguf", "hf"})


def identity(artifact: Artifact) -> dict[str, str]:
    """Return the identity fields an artifact's engine reported (the keys of ``IDENTITY_KEYS`` it has)."""
    return {key: str(artifact.metadata[key]) for key in IDENTITY_KEYS if artifact.metadata.get(key)}


def check_matched_pair(baseline: Artifact, candidate: Artifact) -> None:
    """Return None when the two artifacts are variants of one base model; raise otherwise.

    Every identity field present on both sides must be equal. Fields are only
    comparable within one artifact format (a GGUF architecture name and a
    transformers class name are spelled differently), so across formats only the
    vocabulary size is compared.
    """
    # Only digests measured from files count: an endpoint's digest is what its user declared.
    if baseline.files and baseline.format in MEASURED_FORMATS and baseline.digest == candidate.digest:
        raise InputError(
            f"baseline and candidate are the same model (same content digest {baseline.digest[:12]}): "
            "a model compared with itself measures no drift and would always pass",
            where=f"baseline {baseline.ref} / candidate {candidate.ref}",
            fix="pass the full-precision checkpoint as --baseline and the quantized file as --candidate")
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
