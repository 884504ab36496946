"""The typed record: the shipped schema, read_record / write_record, and malformed records at the front doors.

Real files throughout: records written by the pipeline (``screen_profiles``,
``build_record``), a real key pair, real subprocess runs of ``quantsafe card``,
``attest`` and ``verify``.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_quantsafe.attest import sign as attest
from pytest_quantsafe.errors import InputError
from pytest_quantsafe.policy import load_policy
from pytest_quantsafe.record import model
from pytest_quantsafe.record.store import read_record, record_json, write_record
from pytest_quantsafe.screen import screen_profiles
from pytest_quantsafe.types import Artifact, ArtifactFile, RefusalProfile

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((resources.files("pytest_quantsafe") / "schemas" / "record.schema.json").read_text("utf-8"))

BASELINE = RefusalProfile(
    n_total=40, n_refusals=30, dominant_prefix_share=0.6, unique_prefix_rate=0.1, prefix_entropy_norm=0.3,
    mean_tokens_refusal=12.0, refusal_rate=0.75, refusal_rate_ci=(0.598, 0.858), benign_total=10,
    benign_refusals=1, benign_refusal_rate=0.1, top_prefixes=(("i'm sorry, but i", 25), ("i cannot help", 5)))
_THIN = dataclasses.replace(BASELINE, n_refusals=3, refusal_rate=0.075, refusal_rate_ci=(0.026, 0.199))
#: (baseline, candidate) per case: LOW, HIGH, refusal collapse (HIGH forced), none refused, insufficient data.
CASES = {
    "low": (BASELINE, dataclasses.replace(BASELINE, unique_prefix_rate=0.12)),
    "high": (BASELINE, dataclasses.replace(BASELINE, unique_prefix_rate=0.9, prefix_entropy_norm=0.9,
                                           dominant_prefix_share=0.1)),
    "collapse": (BASELINE, dataclasses.replace(BASELINE, n_refusals=4, refusal_rate=0.1, refusal_rate_ci=(0.04, 0.23))),
    "none": (BASELINE, dataclasses.replace(BASELINE, n_refusals=0, refusal_rate=0.0, refusal_rate_ci=(0.0, 0.09),
                                           dominant_prefix_share=0.0, unique_prefix_rate=0.0, prefix_entropy_norm=0.0,
                                           mean_tokens_refusal=0.0, top_prefixes=())),
    "thin": (_THIN, _THIN),
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", *args], check=False, capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=300)


@pytest.fixture
def artifact_file(tmp_path: Path) -> Path:
    path = tmp_path / "cand.Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def _written(tmp_path: Path, artifact_file: Path, name: str = "low", policy: str = "default") -> Path:
    from pytest_quantsafe._util import file_sha256

    cand = Artifact(ref=str(artifact_file), format="gguf", quantization="Q4_K_M", name="cand",
                    files=(ArtifactFile(str(artifact_file), file_sha256(artifact_file),
                                        artifact_file.stat().st_size),))
    baseline, candidate = CASES[name]
    result = screen_profiles(baseline, candidate, policy=load_policy(policy), candidate_artifact=cand,
                             out_dir=tmp_path / f"out-{name}-{policy}")
    return Path(result.paths["record"])


# --------------------------------------------------------------------------- (b) schema


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("policy", ["default", "strict", "advisory"])
def test_written_records_validate_against_the_shipped_schema(tmp_path: Path, artifact_file: Path, name: str,
                                                             policy: str) -> None:
    data = json.loads(_written(tmp_path, artifact_file, name, policy).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(data)  # independent of the reader's own checks
    assert data["schema"] == "quantsafe.record.v2"
    if data["screening"]["status"] == "insufficient_data":
        assert data["screening"]["band"] is None and data["screening"]["calibration_band"] is None


def test_record_built_for_the_unit_tests_validates() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_record import _inputs

    from pytest_quantsafe.record.build import build_record

    jsonschema.Draft202012Validator(SCHEMA).validate(build_record(**_inputs()))


def _schema_node(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return SCHEMA["$defs"][ref.rsplit("/", 1)[-1]] if ref else node


def test_dataclasses_and_schema_name_the_same_fields() -> None:
    """Adding a block is one dataclass field plus one schema entry: this test keeps the two in step."""
    def walk(cls: type, node: dict[str, Any], path: str) -> None:
        node = _schema_node(node)
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]
        props = node["properties"]
        assert {f.name for f in fields} == set(props) - {"thresholds"}, path
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        assert required == set(node["required"]), path
        hints = typing.get_type_hints(cls)
        for f in fields:
            inner = [a for a in (typing.get_args(hints[f.name]) or (hints[f.name],)) if a is not type(None)]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                walk(inner[0], props[f.name], f"{path}.{f.name}")
            elif typing.get_origin(hints[f.name]) is tuple and dataclasses.is_dataclass(typing.get_args(hints[f.name])[0]):
                walk(typing.get_args(hints[f.name])[0], _schema_node(props[f.name])["items"], f"{path}.{f.name}[]")

    walk(model.Record, SCHEMA, "$")


# --------------------------------------------------------------------------- (d) round trip


def test_round_trip_write_record_read_record(tmp_path: Path, artifact_file: Path) -> None:
    for name in sorted(CASES):
        path = _written(tmp_path, artifact_file, name, "strict")
        text = path.read_text(encoding="utf-8")
        typed = read_record(path)
        assert typed.source == str(path) and typed.to_json() == json.loads(text)
        assert model.Record.from_json(typed.to_json()) == typed
        again = write_record(typed, tmp_path / "copy" / name / "record.json")
        assert again.read_text(encoding="utf-8") == text == record_json(typed)
        assert [p.name for p in again.parent.iterdir()] == ["record.json"]  # no temp file left behind
    assert (typed.screening.status, typed.screening.band) == ("insufficient_data", None)  # "thin", read last


def test_write_record_validates_before_writing(tmp_path: Path, artifact_file: Path) -> None:
    data = json.loads(_written(tmp_path, artifact_file).read_text(encoding="utf-8"))
    data["screening"]["rtsi"] = math.nan
    target = tmp_path / "bad" / "record.json"
    with pytest.raises(InputError, match=r"\$\.screening\.rtsi is not a finite number") as err:
        write_record(data, target)
    assert err.value.where == f"{target}: $.screening.rtsi"
    assert not target.exists()
    good = read_record(_written(tmp_path, artifact_file))
    old = write_record(good, target).read_bytes()
    data["screening"]["rtsi"] = "0.1"
    with pytest.raises(InputError, match="is not of type"):
        write_record(data, target)
    assert target.read_bytes() == old  # the previous record is untouched


# --------------------------------------------------------------------------- (c) malformed records


BREAKS = {
    "missing-nested": (lambda r: r["baseline"]["profile"].pop("refusal_rate"), "$.baseline.profile.refusal_rate",
                       "missing field 'refusal_rate'"),
    "wrong-type": (lambda r: r["screening"].update(rtsi="0.09"), "$.screening.rtsi", "is not of type"),
    "nan": (lambda r: r["candidate"]["profile"].update(prefix_entropy_norm=math.nan),
            "$.candidate.profile.prefix_entropy_norm", "not a finite number"),
}


def _broken(tmp_path: Path, artifact_file: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    data = json.loads(_written(tmp_path, artifact_file).read_text(encoding="utf-8"))
    BREAKS[kind][0](data)
    path = tmp_path / f"broken-{kind}.json"
    path.write_text(json.dumps(data), encoding="utf-8")  # json.dumps writes NaN as the literal NaN
    return path, data


def _assert_clear(proc: subprocess.CompletedProcess[str], where: str, field: str, message: str,
                  code: int = 2, kind: str = "bad_input") -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and f"error[{kind}]" in proc.stderr
    assert f"where: {where}: {field}" in proc.stderr and message in proc.stderr and "fix:" in proc.stderr


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_card_and_attest_refuse_a_malformed_record(tmp_path: Path, artifact_file: Path, kind: str) -> None:
    path, _ = _broken(tmp_path, artifact_file, kind)
    _, field, message = BREAKS[kind]
    _assert_clear(_cli("card", str(path)), str(path), field, message)
    key = tmp_path / "keys" / "signer.pem"
    attest.generate_key(key)
    _assert_clear(_cli("attest", str(path), "--artifact", str(artifact_file), "--key", str(key)), str(path), field,
                  message)
    assert not list(artifact_file.parent.glob("*.dsse.json"))  # nothing signed


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_verify_refuses_a_validly_signed_malformed_record(tmp_path: Path, artifact_file: Path, kind: str) -> None:
    _, data = _broken(tmp_path, artifact_file, kind)
    good = json.loads(_written(tmp_path, artifact_file).read_text(encoding="utf-8"))
    statement = attest.build_statement(good)
    statement["predicate"] = {**copy.deepcopy(data), "thresholds": statement["predicate"]["thresholds"]}
    key = tmp_path / "keys" / "signer.pem"
    info = attest.generate_key(key)
    # Sign the malformed payload as a holder of the pinned key could (NaN written as the JSON literal).
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.dumps(statement, sort_keys=True).encode("utf-8")
    private = attest.load_private_key(key)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    sig = private.sign(attest.pae(attest.PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    envelope = {"payloadType": attest.PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
                "signatures": [{"keyid": info["key_id"], "sig": base64.b64encode(sig).decode("ascii")}]}
    bundle = tmp_path / "record.dsse.json"
    bundle.write_text(json.dumps(envelope), encoding="utf-8")
    _, field, message = BREAKS[kind]
    proc = _cli("verify", str(bundle), "--artifact", str(artifact_file), "--key", info["public_key"])
    # verify: every failure, a malformed signed record included, is exit 4 (its help, README exit codes).
    _assert_clear(proc, f"{bundle}: predicate", field, message, code=4, kind="verification_failed")


def test_old_schema_and_junk_are_named(tmp_path: Path, artifact_file: Path) -> None:
    data = json.loads(_written(tmp_path, artifact_file).read_text(encoding="utf-8"))
    data["schema"] = "quantsafe.record.v1"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data), encoding="utf-8")
    proc = _cli("card", str(old))
    assert proc.returncode == 2 and "record schema 'quantsafe.record.v1' is not quantsafe.record.v2" in proc.stderr
    assert f"where: {old}: $.schema" in proc.stderr and "re-screen" in proc.stderr
    dup = tmp_path / "dup.json"
    dup.write_text('{"schema": "quantsafe.record.v2", "schema": "x"}', encoding="utf-8")
    with pytest.raises(InputError, match="duplicate key 'schema'"):
        read_record(dup)
    with pytest.raises(InputError, match="not found"):
        read_record(tmp_path / "absent.json")


# --------------------------------------------------------------------------- calibration profiles


def test_calibration_profiles_are_checked_against_the_shipped_schema(tmp_path: Path) -> None:
    import yaml

    from pytest_quantsafe.errors import PolicyError
    from pytest_quantsafe.score.calibration import calibration_schema, load_calibration

    packaged = resources.files("pytest_quantsafe") / "policies" / "calibration" / "default.yaml"
    data = yaml.safe_load(packaged.read_text("utf-8"))
    jsonschema.Draft202012Validator(calibration_schema()).validate(data)
    assert load_calibration("default").name == "default"
    data["provenance"]["n_rows"] = "forty-five"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    with pytest.raises(PolicyError, match="provenance.n_rows: 'forty-five' is not of type 'integer'") as err:
        load_calibration(bad)
    assert err.value.where is not None and err.value.where.startswith(f"{bad}: key provenance.n_rows")
    assert err.value.fix is not None and "calibration schema" in err.value.fix
