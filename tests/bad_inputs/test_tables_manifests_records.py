"""Bad CSV tables, delta tables, manifests, profiles and records: documented exit codes, nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bad_inputs.conftest import GOOD_PROFILE
from tests.bad_inputs.helpers import check_case

HEADER = "cell_id,is_baseline,dominant_prefix_share,unique_prefix_rate,prefix_entropy_norm,mean_refusal_token_length,n_refusals,n_total"
BASE = "m1__fp16,true,0.9,0.1,0.2,30.0,90,100"
CAND = "m1__q4,false,0.8,0.2,0.3,35.0,85,100"

#: A.10 CSVs refused outright (exit 2).
CSV_ERRORS: dict[str, bytes] = {
    "empty": b"",
    "header_only": (HEADER + "\n").encode(),
    "baseline_only": (HEADER + "\n" + BASE + "\n").encode(),
    "binary": bytes(range(256)) * 4,
    "latin1": (HEADER + "\n" + BASE + "\nm1__caf\u00e9,false,0.8,0.2,0.3,35,85,100\n").encode("latin-1"),
    "no_cell_id": (HEADER.replace("cell_id", "cell") + "\n" + BASE + "\n" + CAND + "\n").encode(),
    "no_feature": (HEADER.replace("prefix_entropy_norm", "entropy") + "\n" + BASE + "\n" + CAND + "\n").encode(),
    "word_for_number": (HEADER + "\n" + BASE + "\n" + CAND.replace("0.8", "high") + "\n").encode(),
    "bad_bool": (HEADER + "\n" + BASE.replace("true", "perhaps") + "\n" + CAND + "\n").encode(),
    "cell_without_model": (HEADER + "\n" + BASE + "\n" + CAND.replace("m1__q4", "lonely") + "\n").encode(),
    "fractional_count": (HEADER + "\n" + BASE + "\n" + CAND.replace(",85,", ",85.5,") + "\n").encode(),
    "nan_count": (HEADER + "\n" + BASE + "\n" + CAND.replace(",85,", ",nan,") + "\n").encode(),
}

#: A.10 CSVs whose cell is implausible: scored as insufficient data (exit 3), the line named, never a pass.
CSV_IMPLAUSIBLE: dict[str, str] = {
    "huge_mean_length": CAND.replace("35.0", "1e308"),
    "negative_mean_length": CAND.replace("35.0", "-4"),
    "share_above_one": CAND.replace("0.8", "1.5"),
    "nan_feature": CAND.replace("0.3", "nan"),
    "inf_feature": CAND.replace("0.3", "inf"),
    "refusals_above_total": CAND.replace(",85,100", ",120,100"),
    "negative_count": CAND.replace(",85,", ",-5,"),
}


@pytest.mark.parametrize("case", list(CSV_ERRORS))
def test_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path, case: str) -> None:
    path = tmp_path / "cells.csv"
    path.write_bytes(CSV_ERRORS[case])
    check_case(capsys, outputs, ["score-csv", "--input", str(path), "--output", str(outputs / "result.json")], 2,
               names=[str(path)])


@pytest.mark.parametrize("case", list(CSV_IMPLAUSIBLE))
def test_implausible_csv_cell_is_never_a_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                              case: str) -> None:
    path = tmp_path / "cells.csv"
    path.write_text(f"{HEADER}\n{BASE}\n{CSV_IMPLAUSIBLE[case]}\n")
    target = tmp_path / "fresh.json"
    check_case(capsys, outputs, ["score-csv", "--input", str(path), "--output", str(target)], 3,
                     names=[str(path), "line 3", "implausible:candidate."])
    assert json.loads(target.read_text())["cells"][0]["band"] is None


@pytest.mark.parametrize("case", ["missing", "directory", "loop"])
def test_bad_csv_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path, case: str) -> None:
    path = tmp_path / "cells.csv"
    if case == "directory":
        path.mkdir()
    elif case == "loop":
        path.symlink_to(path)
    check_case(capsys, outputs, ["score-csv", "--input", str(path), "--output", str(outputs / "result.json")], 2,
               names=[str(path)])


DELTA_HEADER = ("base_model,quant,refusal_rate_delta,dominant_prefix_share_delta,unique_prefix_rate_delta,"
                "prefix_entropy_norm_delta,mean_tokens_refusal_delta")


def _delta_rows(bad: str | None = None, column: int = 2) -> str:
    rows = [f"m{i},q{i},{-0.01 * i:.2f},{0.01 * i:.2f},{0.02 * i:.2f},{0.03 * i:.2f},{0.5 * i:.2f}" for i in range(1, 8)]
    if bad is not None:
        cells = rows[2].split(",")
        cells[column] = bad
        rows[2] = ",".join(cells)
    return DELTA_HEADER + "\n" + "\n".join(rows) + "\n"


CALIBRATE_CASES: dict[str, str] = {
    "rate_nan": _delta_rows("nan"),
    "rate_inf": _delta_rows("inf"),
    "rate_neg_inf": _delta_rows("-inf"),
    "rate_above_one": _delta_rows("2.5"),
    "rate_word": _delta_rows("lots"),
    "feature_nan": _delta_rows("nan", 3),
    "feature_inf": _delta_rows("inf", 6),
    "no_model_column": _delta_rows().replace("base_model", "who"),
    "empty": "",
}


@pytest.mark.parametrize("case", list(CALIBRATE_CASES))
def test_bad_calibration_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                case: str) -> None:
    path = tmp_path / "deltas.csv"
    path.write_text(CALIBRATE_CASES[case])
    check_case(capsys, outputs, ["calibrate", "--input", str(path), "--output", str(outputs / "profile.yaml")], 2,
               names=[str(path)])


# --------------------------------------------------------------------------- external-screen requests


def _request(**changes: object) -> dict[str, object]:
    feats = {k: v for k, v in GOOD_PROFILE.items() if k != "n_total"}
    req: dict[str, object] = {
        "schema_version": "quantsafe.external-screen.v1", "source_model_id": "org/model",
        "probe_set": {"count": 40, "sha256": "a" * 64},
        "baseline": {"repo_id": "org/model", "revision": "a" * 40, "quantization": "F16", "features": dict(feats)},
        "candidate": {"repo_id": "org/model-q4", "revision": "b" * 40, "quantization": "Q4", "features": dict(feats)},
    }
    for dotted, value in changes.items():
        node: dict[str, object] = req
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]  # type: ignore[assignment]
        node[last] = value
    return req


REQUESTS: dict[str, bytes] = {
    "not_json": b"{nope",
    "empty": b"",
    "array": b"[]",
    "nan": json.dumps(_request(candidate__features__prefix_entropy_norm=float("nan"))).encode(),
    "infinity": json.dumps(_request(candidate__features__mean_tokens_refusal=float("inf"))).encode(),
    "huge_mean_length": json.dumps(_request(candidate__features__mean_tokens_refusal=1e308)).encode(),
    "share_above_one": json.dumps(_request(baseline__features__dominant_prefix_share=1.2)).encode(),
    "refusals_above_count": json.dumps(_request(candidate__features__n_refusals=41)).encode(),
    "negative_refusals": json.dumps(_request(candidate__features__n_refusals=-1)).encode(),
    "count_zero": json.dumps(_request(probe_set__count=0)).encode(),
    "bad_revision": json.dumps(_request(candidate__revision="main")).encode(),
    "bad_sha": json.dumps(_request(probe_set__sha256="xyz")).encode(),
    "wrong_schema": json.dumps(_request(schema_version="v0")).encode(),
    "extra_field": json.dumps(_request(candidate__secret="x")).encode(),
    "too_large": json.dumps(_request(source_model_id="x" * 40000)).encode(),
    "deeply_nested": b"[" * 20000 + b"]" * 20000,
    "binary": bytes(range(256)),
    "bool_count": json.dumps(_request(probe_set__count=True)).encode(),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_bad_external_screen_request(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                     case: str) -> None:
    path = tmp_path / "request.json"
    path.write_bytes(REQUESTS[case])
    check_case(capsys, outputs, ["screen-manifest", str(path), "--output", str(outputs / "result.json")], 2,
               names=[str(path)])


PROFILES: dict[str, object] = {
    "nan": {**GOOD_PROFILE, "unique_prefix_rate": float("nan")},
    "infinity": {**GOOD_PROFILE, "mean_tokens_refusal": float("inf")},
    "huge_length": {**GOOD_PROFILE, "mean_tokens_refusal": 1e308},
    "negative_count": {**GOOD_PROFILE, "n_refusals": -2},
    "refusals_above_total": {**GOOD_PROFILE, "n_refusals": 50},
    "zero_total": {**GOOD_PROFILE, "n_total": 0, "n_refusals": 0},
    "bool_field": {**GOOD_PROFILE, "prefix_entropy_norm": True},
    "string_field": {**GOOD_PROFILE, "dominant_prefix_share": "0.9"},
    "missing_field": {k: v for k, v in GOOD_PROFILE.items() if k != "unique_prefix_rate"},
    "list": [GOOD_PROFILE],
    "share_above_one": {**GOOD_PROFILE, "dominant_prefix_share": 3.0},
}


def _manifest_argv(base: Path, cand: Path, out: Path) -> list[str]:
    return ["manifest", "--baseline", str(base), "--candidate", str(cand), "--source-model-id", "m",
            "--probe-count", "40", "--probe-sha256", "a" * 64, "--baseline-repo", "b", "--baseline-revision",
            "a" * 40, "--baseline-quantization", "F16", "--candidate-repo", "c", "--candidate-revision", "b" * 40,
            "--candidate-quantization", "Q4", "--output", str(out)]


@pytest.mark.parametrize("case", list(PROFILES))
def test_bad_profile_for_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                  case: str) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(GOOD_PROFILE))
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps(PROFILES[case]))
    check_case(capsys, outputs, _manifest_argv(base, cand, outputs / "result.json"), 2, names=[str(cand)])


# --------------------------------------------------------------------------- records (card)


def _record(smollm2_gguf: Path) -> dict[str, object]:
    from tests.test_attest import make_record

    return make_record(smollm2_gguf)


RECORD_CASES = ["not_json", "empty", "array", "empty_object", "nan_rtsi", "no_screening", "deeply_nested",
                "binary", "screening_string", "calibration_list"]


def _bad_record(case: str, good: dict[str, object]) -> bytes:
    if case == "not_json":
        return b"{"
    if case == "empty":
        return b""
    if case == "array":
        return b"[]"
    if case == "empty_object":
        return b"{}"
    if case == "deeply_nested":
        return b"[" * 50000 + b"]" * 50000
    if case == "binary":
        return bytes(range(256))
    data = json.loads(json.dumps(good))
    if case == "nan_rtsi":
        data["screening"]["rtsi"] = float("nan")
    elif case == "no_screening":
        data.pop("screening")
    elif case == "screening_string":
        data["screening"] = "LOW"
    elif case == "calibration_list":
        data["calibration"] = []
    return json.dumps(data).encode()


@pytest.mark.parametrize("case", RECORD_CASES)
def test_bad_record_for_card(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                             smollm2_gguf: Path, case: str) -> None:
    path = tmp_path / "record.json"
    path.write_bytes(_bad_record(case, _record(smollm2_gguf)))
    check_case(capsys, outputs, ["card", str(path), "--output", str(outputs / "card.yaml")], 2, names=[str(path)])
