"""The evidence beside RTSI added to a scored screening: RTSI interval, quality retention, regime, judge.

``assess`` takes the screening ``rtsi.score`` produced and the labelled completions
of both models, and returns the screening with ``rtsi_ci`` and ``band_stability``
(confidence.py), ``quality`` (quality.py), ``regime`` (regime.py) and, when a judge
is given, ``judge`` plus the ``measurement_divergence`` flag (judge.py) filled in.
It never changes RTSI, the band or the profiles: the features stay on the
pattern detector.

Quality is measured only on complete benign answers: when an engine stopped them
early (``finish_reason == "early_exit"``) or the embedding model is not installed,
``quality`` says ``not_measured`` with the reason and ``regime`` stays ``None`` —
an unknown regime is reported as unknown, not as neutral.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_quantsafe.errors import InsufficientDataError, ModelLoadError
from pytest_quantsafe.measure.confidence import N_RESAMPLES, bootstrap_rtsi
from pytest_quantsafe.measure.judge import JudgeDetector, compare, refusal_rates
from pytest_quantsafe.measure.quality import Embedder, quality_retention
from pytest_quantsafe.measure.regime import classify
from pytest_quantsafe.results import Policy, Screening
from pytest_quantsafe.types import Completion

#: Flag added when pattern and judge refusal rates differ by >= 20 pp on either model (paper §3.2).
DIVERGENCE_FLAG = "measurement_divergence"


def measure_quality(baseline: Sequence[Completion], candidate: Sequence[Completion],
                    embedder: Embedder | None = None) -> dict[str, Any]:
    """Return the ``quality`` block: retention figures with ``status: measured``, or ``not_measured`` and why."""
    truncated = [c.probe_id for c in (*baseline, *candidate) if c.kind == "benign" and c.finish_reason == "early_exit"]
    if truncated:
        return {"status": "not_measured",
                "reason": f"{len(truncated)} benign answers were stopped early (early_exit); "
                          "screen with early_exit=False to measure quality"}
    try:
        block = quality_retention(baseline, candidate, embedder=embedder)
    except (InsufficientDataError, ModelLoadError) as exc:
        return {"status": "not_measured", "reason": exc.message}
    return {"status": "measured", **block}


def assess(
    screening: Screening,
    baseline: Sequence[Completion],
    candidate: Sequence[Completion],
    *,
    policy: Policy,
    judge: JudgeDetector | None = None,
    prompts: Mapping[str, str] | None = None,
    embedder: Embedder | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Screening:
    """Return ``screening`` with the RTSI interval, band stability, quality, regime and judge block filled in.

    ``baseline`` and ``candidate`` are the pattern-labelled completions the profiles
    were built from; ``prompts`` (probe id -> request) is needed with a judge.
    """
    changes: dict[str, Any] = {}
    flags = list(screening.flags)
    if screening.status == "scored":
        calibration = dataclasses.replace(policy.calibration, bands=policy.bands)
        boot = bootstrap_rtsi(baseline, candidate, calibration, n_resamples=n_resamples, seed=seed,
                              min_baseline_refusals=policy.min_baseline_refusals,
                              detector=screening.candidate.detector)
        changes["rtsi_ci"] = boot.rtsi_ci
        changes["band_stability"] = dict(boot.band_stability)

    quality = measure_quality(baseline, candidate, embedder)
    changes["quality"] = quality
    if quality["status"] == "measured":
        base_p, cand_p = screening.baseline, screening.candidate
        benign_delta = ((cand_p.benign_refusal_rate - base_p.benign_refusal_rate) * 100.0
                        if base_p.benign_total and cand_p.benign_total else None)
        refusal_delta = (cand_p.refusal_rate - base_p.refusal_rate) * 100.0
        changes["regime"] = classify(quality["quality_delta_pp"], refusal_delta, benign_delta)

    if judge is not None:
        if prompts is None:
            raise InsufficientDataError("a judge needs the probes' requests", fix="pass prompts by probe id")
        harmful_b = [c for c in baseline if c.kind == "harmful"]
        harmful_c = [c for c in candidate if c.kind == "harmful"]
        side_b = refusal_rates(harmful_b, judge.judge(harmful_b, prompts).labels)
        side_c = refusal_rates(harmful_c, judge.judge(harmful_c, prompts).labels)
        block = compare(judge.name, side_b, side_c, judge_model=judge.artifact.name)
        changes["judge"] = block
        if block["measurement_divergence"] and DIVERGENCE_FLAG not in flags:
            flags.append(DIVERGENCE_FLAG)
    changes["flags"] = tuple(flags)
    return dataclasses.replace(screening, **changes)
