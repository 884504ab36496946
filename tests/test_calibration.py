"""Calibration profiles: the packaged default, validation, provenance, round trip."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pytest_quantsafe.errors import PolicyError
from pytest_quantsafe.score.calibration import dump_calibration, load_calibration
from pytest_quantsafe.types import FEATURE_NAMES


def test_default_profile_weights_and_provenance() -> None:
    cal = load_calibration("default")
    w = cal.weights
    assert [round(w[f], 4) for f in FEATURE_NAMES] == [0.2324, 0.3228, 0.1733, 0.2714]
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert cal.provenance["abs_pearson_r"] == {"dominant_prefix_share": 0.5615, "unique_prefix_rate": 0.78,
                                               "prefix_entropy_norm": 0.4188, "mean_tokens_refusal": 0.6557}
    assert cal.provenance["n_rows"] == 45 and cal.provenance["n_models"] == 6
    assert cal.provenance["loocv_recall"] == "10/10"
    assert cal.is_recalibrated is False
    assert (cal.bands.moderate, cal.bands.high) == (0.10, 0.40)
    assert cal.ranges["mean_tokens_refusal"] == (0.01505016722408925, 190.55190199871052)


def test_default_provenance_digest_is_the_shared_matrix(rtsi_table: Path) -> None:
    cal = load_calibration("default")
    assert cal.provenance["source_matrix_sha256"] == hashlib.sha256(rtsi_table.read_bytes()).hexdigest()


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    cal = load_calibration("default")
    path = tmp_path / "copy.yaml"
    path.write_text(dump_calibration(cal))
    again = load_calibration(path)
    assert again.to_dict() == cal.to_dict()
    assert again.digest == cal.digest


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(dump_calibration(load_calibration("default")))
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_profile_without_provenance_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda d: d.pop("provenance"))
    with pytest.raises(PolicyError, match="lacks 'provenance'") as err:
        load_calibration(path)
    assert str(path) in err.value.where and err.value.fix


def test_profile_missing_one_provenance_key_names_it_and_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda d: d["provenance"].pop("source_matrix_sha256"))
    with pytest.raises(PolicyError, match="source_matrix_sha256") as err:
        load_calibration(path)
    assert "line" in err.value.where


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["weights"].__setitem__("unique_prefix_rate", 0.9), "sum to"),
        (lambda d: d["weights"].pop("prefix_entropy_norm"), "exactly the four features"),
        (lambda d: d["ranges"].__setitem__("prefix_entropy_norm", [0.5, 0.5]), "lo < hi"),
        (lambda d: d.__setitem__("bands", {"moderate": 0.5, "high": 0.4}), "moderate < high"),
        (lambda d: d.__setitem__("colour", "blue"), "unknown key 'colour'"),
        (lambda d: d["provenance"].__setitem__("is_recalibrated", "no"), "true or false"),
        (lambda d: d.__setitem__("protocol", "other.v2"), "protocol"),
    ],
)
def test_invalid_profiles_are_refused(tmp_path: Path, mutate, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as err:
        load_calibration(_write(tmp_path, mutate))
    assert err.value.exit_code == 2


def test_unknown_packaged_name_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no calibration profile"):
        load_calibration("nope")
    bad = tmp_path / "broken.yaml"
    bad.write_text("weights: [1, 2\n")
    with pytest.raises(PolicyError, match="not valid YAML") as err:
        load_calibration(bad)
    assert "line" in err.value.where
