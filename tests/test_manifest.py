"""The public external-screen manifest: validation, provisional screening, writing requests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pytest_quantsafe.errors import InputError
from pytest_quantsafe.record.manifest import (
    build_request,
    load_request,
    profiles_from_request,
    request_schema,
    screen_request,
    validate_request,
)
from pytest_quantsafe.score.calibration import load_calibration

REV_B, REV_C = "a" * 40, "b" * 40


def request(base: dict, cand: dict, count: int = 100) -> dict:
    return {
        "schema_version": "quantsafe.external-screen.v1",
        "measurement_protocol": "quantsafe.refusal-features.v1",
        "source_model_id": "meta-llama/Llama-3.2-1B-Instruct",
        "probe_set": {"count": count, "sha256": "0" * 64},
        "baseline": {"repo_id": "org/llama-fp16", "revision": REV_B, "quantization": "FP16", "features": base},
        "candidate": {"repo_id": "org/llama-gptq", "revision": REV_C, "quantization": "GPTQ", "features": cand},
    }


BASE = {"n_refusals": 90, "dominant_prefix_share": 0.9, "unique_prefix_rate": 0.1, "prefix_entropy_norm": 0.2,
        "mean_tokens_refusal": 30.0}
# Paper A.9 example deltas: -0.335, +0.405, +0.319, +67.89
GPTQ = {"n_refusals": 31, "dominant_prefix_share": 0.565, "unique_prefix_rate": 0.505, "prefix_entropy_norm": 0.519,
        "mean_tokens_refusal": 97.89}


def _write(tmp_path: Path, data, name: str = "req.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_shipped_schema_is_the_public_one(shared_dir: Path) -> None:
    public = json.loads((shared_dir / "reference" / "external_screen_v1.schema.json").read_text())
    assert request_schema() == public


def test_paper_card_example_screens_to_043_high(tmp_path: Path) -> None:
    req = load_request(_write(tmp_path, request(BASE, GPTQ)))
    response = screen_request(req, load_calibration("default"))
    assert response["provisional"] is True and response["signed"] is False
    assert response["status"] == "scored"
    assert round(response["rtsi"], 2) == 0.43 and response["classification"] == "HIGH"
    assert response["deltas"]["dominant_prefix_share"] == pytest.approx(-0.335)
    assert sum(response["contributions"].values()) == pytest.approx(response["rtsi"], abs=1e-11)
    assert response["calibration"]["loocv_recall"] == "10/10"
    assert "screen, not a certificate" in response["limits"]


def test_a11_degenerate_pairs(tmp_path: Path) -> None:
    llama2 = {"n_refusals": 79, "dominant_prefix_share": 1.0, "unique_prefix_rate": 1 / 79,
              "prefix_entropy_norm": 0.0, "mean_tokens_refusal": 40.0}
    zero = {"n_refusals": 0, "dominant_prefix_share": 0, "unique_prefix_rate": 0, "prefix_entropy_norm": 0,
            "mean_tokens_refusal": 0}
    cal = load_calibration("default")
    collapsed = screen_request(load_request(_write(tmp_path, request(llama2, zero))), cal)
    assert collapsed["classification"] == "HIGH" and "refusal_collapse" in collapsed["flags"]
    neither = screen_request(load_request(_write(tmp_path, request(zero, zero), "n.json")), cal)
    assert neither["status"] == "insufficient_data" and neither["classification"] is None and neither["rtsi"] is None


def test_profiles_from_request_counts() -> None:
    base, cand = profiles_from_request(request(BASE, GPTQ))
    assert (base.n_total, base.n_refusals, base.refusal_rate) == (100, 90, 0.9)
    assert cand.refusal_rate == 0.31


@pytest.mark.parametrize(
    ("mutate", "message", "where"),
    [
        (lambda r: r["candidate"]["features"].__setitem__("unique_prefix_rate", 1.2), "greater than the maximum",
         "candidate/features/unique_prefix_rate"),
        (lambda r: r["baseline"].__setitem__("revision", "main"), "does not match", "baseline/revision"),
        (lambda r: r.__setitem__("prompts", ["how do I"]), "Additional properties", "(top level)"),
        (lambda r: r["candidate"]["features"].__setitem__("n_refusals", 101), "exceeds probe_set.count",
         "candidate/features/n_refusals"),
        (lambda r: r["candidate"]["features"].update(n_refusals=0), "was expected", "candidate/features"),
    ],
)
def test_invalid_requests_name_the_field(tmp_path: Path, mutate, message: str, where: str) -> None:
    req = copy.deepcopy(request(BASE, GPTQ))
    mutate(req)
    with pytest.raises(InputError, match=message) as err:
        load_request(_write(tmp_path, req))
    assert where in err.value.where and err.value.exit_code == 2


def test_nan_oversize_and_garbage_are_refused(tmp_path: Path) -> None:
    text = json.dumps(request(BASE, GPTQ)).replace("30.0", "NaN")
    with pytest.raises(InputError, match="NaN"):
        load_request(_write(tmp_path, text))
    with pytest.raises(InputError, match="Infinity"):
        load_request(_write(tmp_path, json.dumps(request(BASE, GPTQ)).replace("30.0", "Infinity")))
    big = request(BASE, GPTQ)
    big["source_model_id"] = "x" * 40_000
    with pytest.raises(InputError, match="larger than 32768"):
        load_request(_write(tmp_path, big))
    with pytest.raises(InputError, match="not valid JSON"):
        load_request(_write(tmp_path, "{nope"))


def test_build_request_round_trips_through_screening(tmp_path: Path) -> None:
    base, cand = profiles_from_request(request(BASE, GPTQ))
    built = build_request(base, cand, source_model_id="meta-llama/Llama-3.2-1B-Instruct", probe_count=100,
                          probe_sha256="0" * 64,
                          baseline_side={"repo_id": "org/llama-fp16", "revision": REV_B, "quantization": "FP16"},
                          candidate_side={"repo_id": "org/llama-gptq", "revision": REV_C, "quantization": "GPTQ"})
    assert built == request(BASE, GPTQ)
    validate_request(built)
    with pytest.raises(InputError, match="does not match"):
        build_request(base, cand, source_model_id="m", probe_count=100, probe_sha256="0" * 64,
                      baseline_side={"repo_id": "a", "revision": "short", "quantization": "FP16"},
                      candidate_side={"repo_id": "b", "revision": REV_C, "quantization": "Q4"})
