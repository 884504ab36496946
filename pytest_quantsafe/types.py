"""Frozen values handed from one stage of the pipeline to the next (docs/architecture.md "Data flow").

These are the first half's values (artifacts, probes, completions, the refusal prefix
rule, refusal profiles); the deciding half's (calibration, screening, policy, verdict)
are in ``results.py``. Nothing here computes beyond trivial derived properties and the
text normalisation both sides of the llama.cpp worker share; each stage module owns
its logic and receives what it needs in these values.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

PROTOCOL_ID = "quantsafe.refusal-features.v1"
RECORD_SCHEMA = "quantsafe.record.v2"

#: The four refusal-template features, in the paper's order (and the weights' order).
FEATURE_NAMES: tuple[str, ...] = (
    "dominant_prefix_share",
    "unique_prefix_rate",
    "prefix_entropy_norm",
    "mean_tokens_refusal",
)

Band = Literal["LOW", "MODERATE", "HIGH"]
BANDS: tuple[Band, ...] = ("LOW", "MODERATE", "HIGH")
ProbeKind = Literal["harmful", "benign"]
Outcome = Literal["pass", "fail", "insufficient"]

#: The one-line limits sentence every human-facing output carries.
LIMITS_SENTENCE = (
    "quantsafe is a screen, not a certificate: HIGH routes the model to a full safety "
    "battery, LOW does not mean the model is safe, and a signed record proves what was "
    "screened and how, not that the model is safe."
)


def canonical_json(value: Any) -> bytes:
    """Return the canonical JSON bytes of ``value`` (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class ArtifactFile:
    """One file of a model artifact and its digest."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Artifact:
    """A resolved model: where it is, what format, and the digests that identify it.

    ``format`` is ``"gguf"``, ``"hf"`` or ``"openai"``. ``metadata`` holds what the
    engine read from the artifact (architecture, vocabulary digest, tensor types,
    chat template digest, hub revision...), as plain strings, for the record and for
    the category-mismatch check.
    """

    ref: str
    format: str
    files: tuple[ArtifactFile, ...]
    quantization: str
    name: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Return one digest for the whole artifact (over its files' names and digests)."""
        if len(self.files) == 1:
            return self.files[0].sha256
        listing = [[f.path.rsplit("/", 1)[-1], f.sha256] for f in sorted(self.files, key=lambda f: f.path)]
        return sha256_hex(canonical_json(listing))

    def to_dict(self) -> dict[str, Any]:
        """Return the artifact as plain JSON data."""
        return {
            "ref": self.ref,
            "format": self.format,
            "name": self.name,
            "quantization": self.quantization,
            "digest": self.digest,
            "files": [asdict(f) for f in self.files],
            "metadata": dict(sorted(self.metadata.items())),
        }


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One request put to both models."""

    id: str
    prompt: str
    category: str
    kind: ProbeKind


@dataclass(frozen=True)
class ProbeSet:
    """A named, digested list of probes (harmful and benign)."""

    name: str
    items: tuple[Probe, ...]
    digest: str
    source: str = ""

    @property
    def harmful(self) -> tuple[Probe, ...]:
        """Return the harmful probes, in order."""
        return tuple(p for p in self.items if p.kind == "harmful")

    @property
    def benign(self) -> tuple[Probe, ...]:
        """Return the benign control probes, in order."""
        return tuple(p for p in self.items if p.kind == "benign")

    @property
    def categories(self) -> tuple[str, ...]:
        """Return the sorted harm categories of the harmful probes."""
        return tuple(sorted({p.category for p in self.harmful}))


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationConfig:
    """How completions are generated. Part of the cache key and of the record."""

    max_new_tokens: int = 96
    temperature: float = 0.0
    seed: int = 0
    system_prompt: str | None = None
    #: Sequences decoded together; not part of the cache key's meaning, but recorded.
    batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as plain JSON data."""
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One model answer to one probe. ``n_tokens`` is the engine's own token count."""

    probe_id: str
    kind: ProbeKind
    category: str
    text: str
    n_tokens: int
    finish_reason: str = "stop"
    #: Set by a refusal detector; ``None`` until labelled.
    is_refusal: bool | None = None


# --------------------------------------------------------------------------- refusal prefixes

#: Name of the text normalisation refusal detection compares texts in (``normalize_text``).
NORMALIZATION = "lower-alnum-space.v1"
_NON_WORD = re.compile(r"[^a-z0-9\s]+")
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Return ``text`` lower-cased, with every run of non ``[a-z0-9\\s]`` characters as one space,
    whitespace collapsed and stripped ("I can't" -> "i can t")."""
    lowered = text.lower()
    spaced = _NON_WORD.sub(" ", lowered)
    return _SPACES.sub(" ", spaced).strip()


@dataclass(frozen=True)
class PrefixRule:
    """A detector's refusal rule in a form another process can evaluate on a partial text.

    A text is a refusal when its normalised form equals one of ``openers`` or starts with
    one followed by a space. The llama.cpp worker receives this (``to_dict``) to stop a
    sequence once no continuation can be a refusal, without knowing any refusal words.
    """

    #: Refusal openers, already normalised with ``normalization``.
    openers: tuple[str, ...]
    normalization: str = NORMALIZATION

    def __post_init__(self) -> None:
        if self.normalization != NORMALIZATION:
            raise ValueError(f"unknown text normalisation {self.normalization!r} (known: {NORMALIZATION})")

    def matches(self, text: str) -> bool:
        """Return True when the whole ``text`` is a refusal under this rule."""
        norm = normalize_text(text)
        return any(norm == opener or norm.startswith(opener + " ") for opener in self.openers)

    def could_become_refusal(self, text_so_far: str) -> bool:
        """Return True while some continuation of ``text_so_far`` can still be a refusal.

        ``normalize_text(t)`` is always a string prefix of ``normalize_text(t + more)``
        (characters map one by one, then whitespace is collapsed and stripped), so a
        refusal is still possible exactly when the normalised text so far is a prefix of
        an opener, or already starts with ``opener + " "`` (decided: a refusal).
        """
        norm = normalize_text(text_so_far)
        return any(opener.startswith(norm) or norm.startswith(opener + " ") for opener in self.openers)

    def is_decided_refusal(self, text_so_far: str) -> bool:
        """Return True when every continuation of ``text_so_far`` is a refusal."""
        norm = normalize_text(text_so_far)
        return any(norm.startswith(opener + " ") for opener in self.openers)

    @property
    def digest(self) -> str:
        """Return the SHA-256 of the rule's canonical content (part of the completion cache key)."""
        return sha256_hex(canonical_json(self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        """Return the rule as plain JSON data."""
        return {"normalization": self.normalization, "openers": list(self.openers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrefixRule:
        """Return the rule ``to_dict`` wrote."""
        return cls(openers=tuple(str(o) for o in data["openers"]), normalization=str(data["normalization"]))


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class RefusalProfile:
    """The refusal shape of one model on one probe set (protocol ``refusal-features.v1``)."""

    n_total: int
    n_refusals: int
    dominant_prefix_share: float
    unique_prefix_rate: float
    prefix_entropy_norm: float
    mean_tokens_refusal: float
    refusal_rate: float
    refusal_rate_ci: tuple[float, float]
    benign_total: int = 0
    benign_refusals: int = 0
    benign_refusal_rate: float = 0.0
    detector: str = "pattern.v1"
    protocol: str = PROTOCOL_ID
    #: Most common refusal prefixes with their counts, most common first.
    top_prefixes: tuple[tuple[str, int], ...] = ()

    @property
    def degenerate(self) -> bool:
        """Return True when there are no refusals to measure a shape on."""
        return self.n_refusals == 0

    def features(self) -> dict[str, float]:
        """Return the four RTSI features by name."""
        return {name: float(getattr(self, name)) for name in FEATURE_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """Return the profile as plain JSON data."""
        data = asdict(self)
        data["refusal_rate_ci"] = list(self.refusal_rate_ci)
        data["top_prefixes"] = [[p, c] for p, c in self.top_prefixes]
        return data
