"""The typed screening record (``quantsafe.record.v2``, docs/record-format.md).

Frozen dataclasses mirror the record's JSON one block per class; the
type-directed codec (``record/codec.py``) turns JSON data into a ``Record``
(``Record.from_json``) and back (``Record.to_json``) without losing a key, so ``to_json(from_json(d)) == d``
for every record quantsafe writes. Decoding trusts nothing: the data is first
validated against the shipped JSON Schema (``schemas/record.schema.json``, see
``record/io.py``), and the codec checks every field's type again on the way in,
so a reader never meets a KeyError or AttributeError.

Adding a block (say ``screening.paired``) is one field on the owning dataclass
(``X | None = None`` keeps older records readable) plus one entry in the schema.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.record.codec import RECORD_FIX as _FIX
from pytest_quantsafe.record.codec import decode, encode
from pytest_quantsafe.results import Bands, Calibration, Policy, Screening
from pytest_quantsafe.types import RECORD_SCHEMA, Band, GenerationConfig, Outcome, RefusalProfile

__all__ = ["ArtifactInfo", "BandCutoffs", "CalibrationBlock", "CellIdentity", "EngineInfo", "FileInfo",
           "Generation", "PolicyBlock", "ProbeSetInfo", "Profile", "Record", "RuleInfo", "ScreeningBlock",
           "ScreeningCalibration", "Side", "Tool", "VerdictBlock"]


@dataclass(frozen=True)
class Tool:
    name: str
    version: str


@dataclass(frozen=True)
class CellIdentity:
    """The six A.9 identity fields of the screened cell."""

    model_family: str | None
    base_model: str | None
    quantization_format: str
    detector: str
    judge_model: str | None
    prompt_battery: tuple[str, ...]
    harm_categories: tuple[str, ...]


@dataclass(frozen=True)
class ProbeSetInfo:
    name: str
    digest: str
    count: int
    n_harmful: int
    n_benign: int


@dataclass(frozen=True)
class EngineInfo:
    """The candidate's engine; a cross-engine pair (flag ``cross_engine``) also names the baseline's."""

    name: str
    version: str
    baseline_name: str | None = field(default=None, metadata={"omit_none": True})
    baseline_version: str | None = field(default=None, metadata={"omit_none": True})
    #: The quantization kernel the candidate's weights ran on (a quantized HF checkpoint), e.g.
    #: ``gptqmodel/7.6.0:TorchQuantLinear on cpu``; omitted for dense and GGUF models.
    kernel: str | None = field(default=None, metadata={"omit_none": True})


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    temperature: float
    seed: int
    system_prompt: str | None
    batch_size: int


@dataclass(frozen=True)
class FileInfo:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ArtifactInfo:
    ref: str
    format: str
    name: str
    quantization: str
    digest: str
    files: tuple[FileInfo, ...]
    metadata: Mapping[str, str]


@dataclass(frozen=True)
class Profile:
    """A side's refusal profile (``RefusalProfile.to_dict()``)."""

    n_total: int
    n_refusals: int
    dominant_prefix_share: float
    unique_prefix_rate: float
    prefix_entropy_norm: float
    mean_tokens_refusal: float
    refusal_rate: float
    refusal_rate_ci: tuple[float, float]
    benign_total: int
    benign_refusals: int
    benign_refusal_rate: float
    detector: str
    protocol: str
    top_prefixes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Side:
    artifact: ArtifactInfo
    profile: Profile


@dataclass(frozen=True)
class ScreeningCalibration:
    name: str
    digest: str
    is_recalibrated: bool


@dataclass(frozen=True)
class ScreeningBlock:
    """The comparison. ``band`` is the effective band (policy cutoffs, a band the scorer raised kept):
    the one band every front door shows. ``calibration_band`` is the band under the calibration's
    own cutoffs, as the scorer gave it (``refusal_collapse`` raises it to HIGH)."""

    status: Literal["scored", "insufficient_data"]
    rtsi: float | None
    band: Band | None
    calibration_band: Band | None
    deltas: Mapping[str, float]
    phi: Mapping[str, float]
    contributions: Mapping[str, float]
    refusal_rate_delta: float
    flags: tuple[str, ...]
    calibration: ScreeningCalibration
    rtsi_ci: tuple[float, float] | None
    band_stability: Mapping[str, float] | None
    quality: Mapping[str, Any] | None
    regime: str | None
    judge: Mapping[str, Any] | None
    #: Per-probe paired evidence (measure/paired.py); null for precomputed evidence.
    paired: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class BandCutoffs:
    moderate: float
    high: float


@dataclass(frozen=True)
class CalibrationBlock:
    name: str
    digest: str
    protocol: str
    detector: str
    is_recalibrated: bool
    loocv_recall: str | None
    weights: Mapping[str, float]
    ranges: Mapping[str, tuple[float, float]]
    bands: BandCutoffs
    provenance: Mapping[str, Any]


@dataclass(frozen=True)
class PolicyBlock:
    name: str
    source: str
    digest: str
    calibration: str
    bands: BandCutoffs
    fail_at: Band
    max_refusal_drop_pp: float | None
    min_baseline_refusals: int
    on_insufficient: Literal["fail", "pass"]
    mode: Literal["enforce", "advisory"]
    max_benign_refusal_increase_pp: float | None
    min_band_stability: float | None
    fail_on_flags: tuple[str, ...]
    probes: str | None
    generation: Generation
    max_lost_refusals_pp: float | None = None
    fail_on_significant_drop: bool = False
    require_power_pp: float | None = None
    allow_quantized_baseline: bool = False


@dataclass(frozen=True)
class RuleInfo:
    rule: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class VerdictBlock:
    outcome: Outcome
    exit_code: int
    reasons: tuple[str, ...]
    rules: tuple[RuleInfo, ...] = ()


@dataclass(frozen=True)
class CacheInfo:
    """Completion-cache provenance: was the cache read, how many completions came from it."""

    read: bool
    baseline_from_cache: int
    candidate_from_cache: int
    generated: int
    authentication: str | None = None
    dropped_corrupt: int | None = None
    dropped_unauthenticated: int | None = None


@dataclass(frozen=True)
class Record:
    """One screening record. ``created`` is left out of the body digest (``build.body_digest``)."""

    schema: str
    tool: Tool
    created: str
    protocol: str
    cell_identity: CellIdentity
    probe_set: ProbeSetInfo
    engine: EngineInfo
    generation: Generation
    baseline: Side
    candidate: Side
    screening: ScreeningBlock
    calibration: CalibrationBlock
    policy: PolicyBlock
    verdict: VerdictBlock
    limits: str
    #: The per-probe file beside the record (``samples.jsonl``): its name, sha256 and row count.
    samples: Mapping[str, Any] | None = None
    cache: CacheInfo | None = None
    #: Where the record came from (a file path or "<record>"), for error messages; not part of the JSON.
    source: str = field(default="<record>", compare=False, metadata={"json": False})

    @classmethod
    def from_json(cls, data: Any, source: str = "<record>") -> Record:
        """Return the typed record of JSON data; raise InputError naming ``source`` and the JSON path."""
        record = decode(cls, data, source, "$")
        record = dataclasses.replace(record, source=source)
        record._check_invariants()
        return record

    def to_json(self) -> dict[str, Any]:
        """Return the record as plain JSON data (every key the record was read with)."""
        out: dict[str, Any] = encode(self)
        return out

    def screening_value(self) -> Screening:
        """Return the ``Screening`` this record was built from (``band`` = the scorer's band)."""
        s = self.screening
        return Screening(
            status=s.status, rtsi=s.rtsi, band=s.calibration_band, deltas=s.deltas, phi=s.phi,
            contributions=s.contributions, refusal_rate_delta=s.refusal_rate_delta, flags=s.flags,
            baseline=_profile_value(self.baseline.profile), candidate=_profile_value(self.candidate.profile),
            calibration_name=s.calibration.name, calibration_digest=s.calibration.digest,
            is_recalibrated=s.calibration.is_recalibrated, rtsi_ci=s.rtsi_ci, band_stability=s.band_stability,
            quality=s.quality, regime=s.regime, judge=s.judge, paired=s.paired)

    def policy_value(self) -> Policy:
        """Return the ``Policy`` (with its ``Calibration``) the record was decided under."""
        c, p = self.calibration, self.policy
        calibration = Calibration(name=c.name, weights=c.weights, ranges=c.ranges,
                                  bands=Bands(c.bands.moderate, c.bands.high), provenance=c.provenance,
                                  detector=c.detector, protocol=c.protocol)
        return Policy(
            name=p.name, source=p.source, digest=p.digest, calibration=calibration,
            bands=Bands(p.bands.moderate, p.bands.high), fail_at=p.fail_at,
            max_refusal_drop_pp=p.max_refusal_drop_pp, min_baseline_refusals=p.min_baseline_refusals,
            on_insufficient=p.on_insufficient, mode=p.mode,
            max_benign_refusal_increase_pp=p.max_benign_refusal_increase_pp,
            min_band_stability=p.min_band_stability, fail_on_flags=p.fail_on_flags, probes=p.probes,
            max_lost_refusals_pp=p.max_lost_refusals_pp, fail_on_significant_drop=p.fail_on_significant_drop,
            require_power_pp=p.require_power_pp, allow_quantized_baseline=p.allow_quantized_baseline,
            generation=GenerationConfig(**encode(p.generation)))

    def _check_invariants(self) -> None:
        # Consistency (band, verdict, exit code) is record/check.py's, through policy.py; here only the version.
        if self.schema != RECORD_SCHEMA:
            raise InputError(f"record schema {self.schema!r} is not {RECORD_SCHEMA}", where=f"{self.source}: $.schema",
                             fix=_FIX)


def _profile_value(profile: Profile) -> RefusalProfile:
    return RefusalProfile(**{f.name: getattr(profile, f.name) for f in dataclasses.fields(Profile)})
