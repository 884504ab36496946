"""Calibration fit, LOOCV, leave-one-family-out AUC and the paper's Table 3, from rtsi_table.csv."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.score.calibration import load_calibration
from pytest_quantsafe.score.fit import (
    calibrate,
    danger_labels,
    family_auc,
    fit,
    loocv,
    matched_low,
    pearson,
    roc_auc,
    table3,
)
from pytest_quantsafe.score.ingest import DeltaRow, read_matrix
from pytest_quantsafe.types import FEATURE_NAMES


@pytest.fixture(scope="module")
def matrix(rtsi_table: Path):
    rows, raw = read_matrix(rtsi_table)
    return rows, raw


def test_fit_reproduces_the_default_weights_and_ranges(matrix) -> None:
    rows, _ = matrix
    fitted = fit(rows)
    default = load_calibration("default")
    for f, paper in zip(FEATURE_NAMES, (0.2324, 0.3228, 0.1733, 0.2714)):
        assert abs(fitted.weights[f] - paper) <= 1e-4
    for f in FEATURE_NAMES:
        assert fitted.weights[f] == pytest.approx(default.weights[f], abs=1e-4)
        assert fitted.ranges[f] == default.ranges[f]
        assert round(fitted.abs_r[f], 4) == default.provenance["abs_pearson_r"][f]


def test_labels_are_paper_table1(matrix) -> None:
    rows, _ = matrix
    labels, source = danger_labels(rows)
    assert sum(labels) == 10 and "Table 1" in source
    assert {(r.model, r.variant) for r, d in zip(rows, labels) if d} >= {("mistral-7b", "Q2_K"), ("phi-2", "GPTQ")}


def test_loocv_keeps_all_ten_danger_rows_out_of_low(matrix) -> None:
    rows, _ = matrix
    labels, _ = danger_labels(rows)
    result = loocv(rows, labels)
    assert result.recall == "10/10"
    assert result.low_count == 23
    assert all(b != "LOW" for r, b in zip(rows, result.bands) if r.variant in ("AWQ", "GPTQ"))  # all 11 AWQ/GPTQ


def test_table3_reproduces_the_paper_exactly(matrix) -> None:
    rows, _ = matrix
    labels, _ = danger_labels(rows)
    got = {(t["screen"], t["routed"], t["low_bucket"]) for t in table3(rows, labels, load_calibration("default"))}
    assert got == {
        ("RTSI (4-feature)", 10, 23),
        ("unique_prefix_rate_delta", 9, 23),
        ("refusal_rate_delta", 8, 22),
        ("dominant_prefix_share_delta", 7, 23),
        ("prefix_entropy_norm_delta", 6, 23),
    }


def test_family_auc_measured_on_the_matrix(matrix) -> None:
    rows, _ = matrix
    labels, _ = danger_labels(rows)
    result = family_auc(rows, labels)
    assert result["n_families"] == 4
    assert result["pooled_auc"] == pytest.approx(0.7828571428571428, abs=1e-12)
    assert result["per_family"]["Phi"] == 1.0


def test_calibrate_writes_recalibrated_provenance(matrix) -> None:
    rows, raw = matrix
    cal, report = calibrate(rows, source_sha256=hashlib.sha256(raw).hexdigest(), date="2026-11-22")
    assert cal.is_recalibrated is True
    assert cal.provenance["loocv_recall"] == "10/10"
    assert cal.provenance["n_rows"] == 45 and cal.provenance["n_models"] == 6
    assert report["loocv"]["low_bucket"] == 23
    assert [t["routed"] for t in report["table3"]] == [10, 9, 8, 7, 6]


def test_small_helpers() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    with pytest.raises(InputError, match="constant"):
        pearson([1, 1, 1], [1, 2, 3])
    assert roc_auc([0.9, 0.1, 0.5], [True, False, False]) == 1.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.5], [True]) is None
    assert matched_low([1, 2, 2, 3], 2) == (1, 2)   # a tie at the cut shrinks the bucket
    assert matched_low([1, 2, 3], 5) == (3, float("inf"))


def test_fallback_labels_without_table1_rows() -> None:
    rows = [DeltaRow(model="m", variant=f"v{i}", family="f", deltas={f: 0.0 for f in FEATURE_NAMES},
                     refusal_rate_delta=d) for i, d in enumerate([-0.2, -0.05, 0.0])]
    labels, source = danger_labels(rows)
    assert labels == [True, False, False] and "refusal-rate drop" in source
