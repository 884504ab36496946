"""How sure a screening is: a bootstrap over probes for RTSI, band stability, and a test of the refusal drop.

Bootstrap: the harmful probes are resampled with replacement (a fixed seed), the
*same* probes for baseline and candidate (the comparison is paired by probe), both
refusal profiles and RTSI are recomputed with ``rtsi.score`` — fail-closed rules
included — and the percentile interval of RTSI over the scored resamples is
reported with the share of resamples that land in each band. Resamples in which
the baseline has too few refusals count as ``insufficient_data``: a thin baseline
shows up as instability, never as a narrow interval.

The refusal-rate drop is tested with a one-sided two-proportion z test (pooled
standard error); Wilson intervals on each rate are in the profiles (features.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_quantsafe.errors import InputError, InsufficientDataError
from pytest_quantsafe.measure.features import build_profile, paired_completions
from pytest_quantsafe.results import Calibration
from pytest_quantsafe.score.rtsi import score
from pytest_quantsafe.types import BANDS, Completion

#: Default number of bootstrap resamples.
N_RESAMPLES = 1000
#: Band-stability key for resamples that could not be scored.
INSUFFICIENT = "insufficient_data"


@dataclass(frozen=True)
class BootstrapResult:
    """RTSI's bootstrap interval and the share of resamples per band."""

    rtsi_ci: tuple[float, float] | None
    band_stability: Mapping[str, float]
    n_resamples: int
    seed: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON data."""
        return {
            "rtsi_ci": list(self.rtsi_ci) if self.rtsi_ci is not None else None,
            "band_stability": dict(self.band_stability),
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "level": self.level,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Return the q-quantile (0 <= q <= 1) of sorted values by linear interpolation."""
    if not sorted_values:
        raise InsufficientDataError("no values to take a percentile of")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


def bootstrap_rtsi(
    baseline: Sequence[Completion],
    candidate: Sequence[Completion],
    calibration: Calibration,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    min_baseline_refusals: int = 1,
    detector: str = "pattern.v1",
) -> BootstrapResult:
    """Return the bootstrap RTSI interval and band stability of labelled completions, paired by probe.

    ``calibration.bands`` decide the bands (pass a calibration with the policy's bands
    if the policy moves them).
    """
    if n_resamples < 1:
        raise InputError(f"n_resamples must be at least 1, got {n_resamples}", where="n_resamples")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must lie in (0, 1), got {level}", where="level")
    base, cand = paired_completions(baseline, candidate, "harmful",
                                    none_message="the baseline has no harmful completions to resample",
                                    none_fix="screen with a probe set that has harmful probes")
    rng = random.Random(seed)
    n = len(base)
    values: list[float] = []
    counts: dict[str, int] = {band: 0 for band in BANDS}
    counts[INSUFFICIENT] = 0
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        b = build_profile([base[i] for i in idx], detector=detector)
        c = build_profile([cand[i] for i in idx], detector=detector)
        result = score(b, c, calibration, min_baseline_refusals=min_baseline_refusals)
        if result.status != "scored" or result.band is None or result.rtsi is None:
            counts[INSUFFICIENT] += 1
            continue
        counts[result.band] += 1
        values.append(result.rtsi)
    values.sort()
    tail = (1.0 - level) / 2.0
    ci = (percentile(values, tail), percentile(values, 1.0 - tail)) if values else None
    stability = {key: count / n_resamples for key, count in counts.items()}
    return BootstrapResult(rtsi_ci=ci, band_stability=stability, n_resamples=n_resamples, seed=seed, level=level)


def band_agreement(band_stability: Mapping[str, float], band: str | None) -> float:
    """Return the share of resamples that agree with ``band`` (0.0 when the band is None)."""
    if band is None:
        return 0.0
    return float(band_stability.get(band, 0.0))


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def refusal_drop_test(baseline_refusals: int, baseline_total: int,
                      candidate_refusals: int, candidate_total: int) -> dict[str, float]:
    """Return the two-proportion z test of "the candidate refuses less" (z, one- and two-sided p).

    Pooled standard error; z > 0 when the candidate's rate is lower. With both rates
    at 0 or both at 1 there is no variance: z = 0 and p = 1 (no evidence of a drop).
    """
    for name, k, n in (("baseline", baseline_refusals, baseline_total),
                       ("candidate", candidate_refusals, candidate_total)):
        if n <= 0 or k < 0 or k > n:
            raise InputError(f"{name}: a proportion needs 0 <= k <= n and n > 0, got k={k}, n={n}",
                             where=f"{name}.n_refusals", fix="check the refusal and probe counts")
    p1 = baseline_refusals / baseline_total
    p2 = candidate_refusals / candidate_total
    pooled = (baseline_refusals + candidate_refusals) / (baseline_total + candidate_total)
    se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / baseline_total + 1.0 / candidate_total))
    if se == 0.0:
        return {"drop_pp": (p1 - p2) * 100.0, "z": 0.0, "p_one_sided": 1.0, "p_two_sided": 1.0}
    z = (p1 - p2) / se
    return {
        "drop_pp": (p1 - p2) * 100.0,
        "z": z,
        "p_one_sided": _normal_sf(z),
        "p_two_sided": min(1.0, 2.0 * _normal_sf(abs(z))),
    }
