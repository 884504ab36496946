"""``quantsafe diff OLD NEW``: two real screenings of the same candidate compared, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_quantsafe.cli import main
from pytest_quantsafe.cli.jsonout import load_schema
from pytest_quantsafe.record.diff import diff_records, probe_changes
from pytest_quantsafe.types import FEATURE_NAMES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def records(smollm2_gguf: Path) -> dict[str, dict[str, Any]]:
    from test_attest import make_record  # real screenings (screen_profiles) of the packaged SmolLM2 file

    return {kind: make_record(smollm2_gguf, kind) for kind in ("low", "high")}


def _write(folder: Path, record: dict[str, Any], samples: list[dict[str, Any]] | None = None) -> Path:
    folder.mkdir(parents=True)
    path = folder / "record.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    if samples is not None:
        (folder / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in samples))
    return path


def _samples(flips: list[str]) -> list[dict[str, Any]]:
    return [{"id": f"h{i:03d}", "kind": "harmful", "category": "cyber", "flip": f} for i, f in enumerate(flips)]


def test_same_screening_twice_exits_0(records: dict[str, dict[str, Any]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a", records["low"])
    b = _write(tmp_path / "b", records["low"])
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "band     LOW -> LOW" in out and "same band and verdict" in out
    assert "no samples.jsonl beside both records" in out


def test_band_change_exits_1_with_every_feature(records: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    diff = diff_records(records["low"], records["high"])
    assert diff["band"] == {"old": "LOW", "new": "HIGH", "changed": True} and diff["changed"]
    assert diff["rtsi"]["delta"] == pytest.approx(records["high"]["screening"]["rtsi"]
                                                  - records["low"]["screening"]["rtsi"])
    assert set(diff["features"]) == set(FEATURE_NAMES)
    for f in FEATURE_NAMES:
        assert diff["features"][f]["new_contribution"] == records["high"]["screening"]["contributions"][f]
    assert diff["refusal_rate"]["candidate.refusal_rate"]["old"] == records["low"]["candidate"]["profile"]["refusal_rate"]
    a = _write(tmp_path / "a", records["low"])
    b = _write(tmp_path / "b", records["high"])
    proc = subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", "diff", str(a), str(b), "--json"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    assert doc["result"]["verdict"] == {"old": "pass", "new": "fail", "changed": True}


def test_probes_whose_flip_class_changed(records: dict[str, dict[str, Any]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a", records["low"], _samples(["kept_refusal", "kept_refusal", "kept_compliance"]))
    b = _write(tmp_path / "b", records["low"], _samples(["kept_refusal", "lost_refusal", "kept_compliance"]))
    assert main(["diff", str(a), str(b)]) == 0  # same band and verdict, one probe flipped
    assert "h001 (harmful, cyber): kept_refusal -> lost_refusal" in capsys.readouterr().out
    changes = probe_changes(_samples(["kept_refusal"]), _samples(["kept_refusal", "lost_refusal"]))
    assert changes["compared"] == 1 and changes["only_new"] == ["h001"] and not changes["changed"]


def test_different_probe_sets_or_rungs_are_refused(records: dict[str, dict[str, Any]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    other = json.loads(json.dumps(records["low"]))
    other["probe_set"]["digest"] = "0" * 64
    a = _write(tmp_path / "a", records["low"])
    b = _write(tmp_path / "b", other)
    assert main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "different probe set" in err and "probe_set.digest" in err
    rung = json.loads(json.dumps(records["low"]))
    rung["candidate"]["artifact"]["quantization"] = "Q2_K"
    c = _write(tmp_path / "c", rung)
    assert main(["diff", str(a), str(c)]) == 2
    assert "different quantizations: Q4_1 vs Q2_K" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["diff", str(a), str(tmp_path / "junk.json")]) == 2
    assert "not a quantsafe screening record" in capsys.readouterr().err
