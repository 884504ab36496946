"""Bootstrap RTSI interval, band stability and the refusal-drop test on labelled completions."""

from __future__ import annotations

import math

import pytest

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.measure.confidence import bootstrap_rtsi, percentile
from pytest_quantsafe.measure.features import build_profile
from pytest_quantsafe.score.calibration import load_calibration
from pytest_quantsafe.score.rtsi import score
from pytest_quantsafe.types import Completion

TEMPLATED = "I'm sorry, but I can't assist with that."


def _harmful(texts: list[tuple[str, bool, int]]) -> list[Completion]:
    return [Completion(probe_id=f"h{i}", kind="harmful", category="cyber", text=t, n_tokens=n, is_refusal=r)
            for i, (t, r, n) in enumerate(texts)]


@pytest.fixture(scope="module")
def calibration():
    return load_calibration("default")


def test_identical_models_are_always_low_with_a_zero_interval(calibration) -> None:
    side = _harmful([(TEMPLATED, True, 12)] * 30 + [("Sure, here is how.", False, 40)] * 10)
    result = bootstrap_rtsi(side, side, calibration, n_resamples=200, seed=0)
    assert result.rtsi_ci == (0.0, 0.0)
    assert result.band_stability["LOW"] == 1.0
    assert result.band_stability["insufficient_data"] == 0.0


def test_a_collapsed_candidate_is_high_in_every_resample(calibration) -> None:
    base = _harmful([(TEMPLATED, True, 12)] * 30 + [("Sure.", False, 40)] * 10)
    cand = _harmful([("Sure, step one.", False, 60)] * 40)
    result = bootstrap_rtsi(base, cand, calibration, n_resamples=200, seed=1)
    assert result.band_stability["HIGH"] == 1.0


def test_drifting_candidate_interval_brackets_the_point_estimate(calibration) -> None:
    base = _harmful([(TEMPLATED, True, 12)] * 28 + [("I cannot help with that request.", True, 9)] * 2
                    + [("Sure.", False, 40)] * 10)
    diverse = [f"I'm sorry, variant {w} of the answer" for w in
               ("alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta")]
    cand_rows = [(diverse[i % 8], True, 30) for i in range(24)] + [("Sure thing.", False, 50)] * 16
    cand = _harmful(cand_rows)
    point = score(build_profile(base), build_profile(cand), calibration)
    result = bootstrap_rtsi(base, cand, calibration, n_resamples=300, seed=0)
    assert point.rtsi is not None and result.rtsi_ci is not None
    lo, hi = result.rtsi_ci
    assert lo <= point.rtsi <= hi
    assert hi - lo > 0.0
    assert math.isclose(sum(result.band_stability.values()), 1.0)
    # the point estimate's band is the most common band among resamples
    assert max(result.band_stability, key=result.band_stability.get) == point.band


def test_seed_fixes_the_result(calibration) -> None:
    base = _harmful([(TEMPLATED, True, 12)] * 20 + [("I cannot do it.", True, 6)] * 5 + [("Sure.", False, 9)] * 15)
    cand = _harmful([(TEMPLATED, True, 14)] * 12 + [("I won't do it at all.", True, 8)] * 8
                    + [("Sure.", False, 9)] * 20)
    a = bootstrap_rtsi(base, cand, calibration, n_resamples=100, seed=7)
    b = bootstrap_rtsi(base, cand, calibration, n_resamples=100, seed=7)
    c = bootstrap_rtsi(base, cand, calibration, n_resamples=100, seed=8)
    assert a == b
    assert a.rtsi_ci != c.rtsi_ci


def test_a_thin_baseline_shows_as_insufficient_resamples(calibration) -> None:
    # one refusal in 40: a resample misses it with probability (39/40)^40 = 0.363
    base = _harmful([(TEMPLATED, True, 12)] + [("Sure.", False, 9)] * 39)
    cand = _harmful([(TEMPLATED, True, 12)] + [("Sure.", False, 9)] * 39)
    result = bootstrap_rtsi(base, cand, calibration, n_resamples=2000, seed=0)
    assert result.band_stability["insufficient_data"] == pytest.approx((39 / 40) ** 40, abs=0.03)
    assert result.band_stability["LOW"] == pytest.approx(1 - (39 / 40) ** 40, abs=0.03)


def test_unpaired_probes_are_refused(calibration) -> None:
    base = _harmful([(TEMPLATED, True, 12)] * 3)
    cand = [Completion(probe_id="other", kind="harmful", category="c", text=TEMPLATED, n_tokens=12,
                       is_refusal=True)] * 3
    with pytest.raises(InputError) as info:
        bootstrap_rtsi(base, cand, calibration, n_resamples=10)
    assert info.value.where == "probe h0"


def test_percentile_interpolates() -> None:
    assert percentile([0.0, 1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.25) == 2.5
