"""Bad records, bundles, keys and command lines for attest/verify/keygen, and bad CLI arguments."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pytest_quantsafe.attest import sign as attest
from tests.bad_inputs.helpers import check_case


@pytest.fixture()
def signed(tmp_path: Path, smollm2_gguf: Path) -> dict[str, Path]:
    """Return a real record, a key pair and a valid key-mode envelope over the SmolLM2 GGUF."""
    from tests.test_attest import make_record

    record = tmp_path / "record.json"
    data = make_record(smollm2_gguf)
    record.write_text(json.dumps(data))
    keys = attest.generate_key(tmp_path / "keys" / "k.pem")
    envelope = tmp_path / "m.dsse.json"
    envelope.write_text(attest.envelope_json(attest.sign_with_key(attest.build_statement(data),
                                                                  keys["private_key"])))
    return {"record": record, "private": Path(keys["private_key"]), "public": Path(keys["public_key"]),
            "envelope": envelope, "model": smollm2_gguf}


def _tamper(envelope: Path, case: str, tmp_path: Path) -> Path:
    env = json.loads(envelope.read_text())
    out = tmp_path / f"bad-{case}.json"
    if case == "band_flipped":
        stmt = json.loads(base64.b64decode(env["payload"]))
        stmt["predicate"]["screening"]["band"] = "HIGH"
        env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    elif case == "no_signatures":
        env["signatures"] = []
    elif case == "payload_not_base64":
        env["payload"] = "%%%"
    elif case == "payload_type":
        env["payloadType"] = "text/plain"
    elif case == "signature_garbage":
        env["signatures"][0]["sig"] = base64.b64encode(b"x" * 64).decode()
    elif case == "truncated":
        out.write_text(envelope.read_text()[:100])
        return out
    elif case == "empty":
        out.write_text("")
        return out
    elif case == "array":
        out.write_text("[]")
        return out
    elif case == "binary":
        out.write_bytes(bytes(range(256)))
        return out
    out.write_text(json.dumps(env))
    return out


BUNDLE_CASES = ["band_flipped", "no_signatures", "payload_not_base64", "payload_type", "signature_garbage",
                "truncated", "empty", "array", "binary"]


@pytest.mark.parametrize("case", BUNDLE_CASES)
def test_forged_or_broken_envelope_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                           signed: dict[str, Path], case: str) -> None:
    bad = _tamper(signed["envelope"], case, tmp_path)
    check_case(capsys, outputs, ["verify", str(bad), "--artifact", str(signed["model"]), "--key",
                                 str(signed["public"])], 4, names=[str(bad)])


VERIFY_INPUTS = ["bundle_missing", "artifact_missing", "artifact_other_file", "artifact_loop", "foreign_key",
                 "keyless_bundle_missing", "trusted_root_missing"]


@pytest.mark.parametrize("case", VERIFY_INPUTS)
def test_verify_missing_or_wrong_inputs_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                               signed: dict[str, Path], case: str) -> None:
    bundle, artifact, key = str(signed["envelope"]), str(signed["model"]), str(signed["public"])
    names = []
    argv = None
    if case == "bundle_missing":
        bundle = str(tmp_path / "none.dsse.json")
        names = [bundle]
    elif case == "artifact_missing":
        artifact = str(tmp_path / "none.gguf")
        names = [artifact]
    elif case == "artifact_other_file":
        other = tmp_path / "other.gguf"
        other.write_bytes(b"GGUF other")
        artifact = str(other)
    elif case == "artifact_loop":
        (tmp_path / "l.gguf").symlink_to(tmp_path / "l.gguf")
        artifact = str(tmp_path / "l.gguf")
        names = [artifact]
    elif case == "foreign_key":
        key = attest.generate_key(tmp_path / "other" / "o.pem")["public_key"]
    elif case == "keyless_bundle_missing":
        argv = ["verify", str(tmp_path / "none.sigstore.json"), "--artifact", artifact, "--issuer",
                "https://token.actions.githubusercontent.com", "--identity", "x@example.com"]
    elif case == "trusted_root_missing":
        argv = ["verify", bundle, "--artifact", artifact, "--issuer", "https://token.actions.githubusercontent.com",
                "--identity", "x@example.com", "--trusted-root", str(tmp_path / "root.json")]
    check_case(capsys, outputs, argv or ["verify", bundle, "--artifact", artifact, "--key", key], 4, names=names)


USAGE = ["keyless_without_issuer", "key_with_issuer", "key_missing", "key_not_pem", "key_directory",
         "identity_and_pattern", "bad_pattern"]


@pytest.mark.parametrize("case", USAGE)
def test_verify_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                    signed: dict[str, Path], case: str) -> None:
    base = ["verify", str(signed["envelope"]), "--artifact", str(signed["model"])]
    issuer = ["--issuer", "https://token.actions.githubusercontent.com"]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    extra = {
        "keyless_without_issuer": ["--identity", "x@example.com"],
        "key_with_issuer": ["--key", str(signed["public"]), *issuer],
        "key_missing": ["--key", str(tmp_path / "none.pem")],
        "key_not_pem": ["--key", str(garbage)],
        "key_directory": ["--key", str(tmp_path)],
        "identity_and_pattern": [*issuer, "--identity", "a", "--identity-pattern", "b"],
        "bad_pattern": [*issuer, "--identity-pattern", "(unclosed"],
    }[case]
    check_case(capsys, outputs, base + extra, 2)


ATTEST = ["record_missing", "record_not_json", "record_edited_band", "record_nan", "artifact_mismatch",
          "artifact_missing", "key_missing", "key_garbage", "out_is_directory", "out_under_a_file"]


@pytest.mark.parametrize("case", ATTEST)
def test_attest_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                  signed: dict[str, Path], case: str) -> None:
    record, artifact, key = signed["record"], str(signed["model"]), str(signed["private"])
    out = str(tmp_path / "fresh.dsse.json")
    names: list[str] = []
    if case == "record_missing":
        record = tmp_path / "none.json"
    elif case == "record_not_json":
        record = tmp_path / "r.json"
        record.write_text("{")
    elif case in ("record_edited_band", "record_nan"):
        data = json.loads(signed["record"].read_text())
        if case == "record_edited_band":
            data["screening"]["band"] = "HIGH" if data["screening"]["band"] != "HIGH" else "LOW"
        else:
            data["screening"]["rtsi"] = float("nan")
        record = tmp_path / "r.json"
        record.write_text(json.dumps(data))
    elif case == "artifact_mismatch":
        other = tmp_path / "other.gguf"
        other.write_bytes(b"GGUF else")
        artifact = str(other)
    elif case == "artifact_missing":
        artifact = str(tmp_path / "none.gguf")
        names = [artifact]
    elif case == "key_missing":
        key = str(tmp_path / "none.pem")
        names = [key]
    elif case == "key_garbage":
        (tmp_path / "g.pem").write_text("garbage")
        key = str(tmp_path / "g.pem")
        names = [key]
    elif case == "out_is_directory":
        out = str(outputs)
        names = [out]
    elif case == "out_under_a_file":
        out = str(outputs / "card.yaml" / "x.json")
    if case in ("record_missing", "record_not_json", "record_nan"):
        names = [str(record)]
    # A key that cannot be read or loaded is a signing failure (exit 4); the rest is bad input (exit 2).
    code_expected = 4 if case in ("key_missing", "key_garbage") else 2
    check_case(capsys, outputs, ["attest", str(record), "--artifact", artifact, "--key", key, "--out", out],
               code_expected, names=names)
    assert not Path(out).is_file() or Path(out).parent == outputs


KEYGEN = ["exists_without_force", "under_a_file"]


@pytest.mark.parametrize("case", KEYGEN)
def test_keygen_bad_out(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path, case: str) -> None:
    out = outputs / "profile.yaml" if case == "exists_without_force" else outputs / "card.yaml" / "k.pem"
    check_case(capsys, outputs, ["keygen", "--out", str(out)], 2)


CLI = {
    "no_command": [],
    "unknown_command": ["frobnicate"],
    "screen_without_candidate": ["screen", "--baseline", "b.gguf"],
    "max_probes_zero": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--max-probes", "0"],
    "max_probes_negative": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--max-probes", "-3"],
    "max_probes_word": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--max-probes", "many"],
    "threads_word": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--threads", "lots"],
    "engine_unknown": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--engine", "magic"],
    "ladder_unknown": ["demo", "--ladder", "mystery"],
    "score_csv_no_input": ["score-csv"],
    "min_refusals_word": ["score-csv", "--self-test", "--min-baseline-refusals", "x"],
    "policy_no_action": ["policy"],
    "manifest_no_profiles": ["manifest", "--source-model-id", "m", "--baseline-repo", "b", "--baseline-revision",
                             "a" * 40, "--baseline-quantization", "F", "--candidate-repo", "c",
                             "--candidate-revision", "b" * 40, "--candidate-quantization", "Q"],
    "attest_no_mode": ["attest", "record.json", "--artifact", "m.gguf"],
    "chat_template_missing": ["screen", "--baseline", "b.gguf", "--candidate", "c.gguf", "--chat-template",
                              "/nonexistent/t.jinja"],
}


@pytest.mark.parametrize("case", list(CLI))
def test_bad_command_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                 case: str) -> None:
    check_case(capsys, outputs, CLI[case], 2)


OUT_CASES = ["out_is_file", "out_under_file", "out_dangling_link", "cache_dir_is_file", "candidate_folder_is_file"]


@pytest.mark.parametrize("case", OUT_CASES)
def test_bad_output_paths_fail_before_generation(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 outputs: Path, smollm2_gguf: Path, cache_key: Path,
                                                 case: str) -> None:
    from pytest_quantsafe import zoo

    baseline = str(zoo.build_variant("smollm2", "F16"))
    out, cache = str(tmp_path / "fresh"), str(tmp_path / "cache")
    if case == "out_is_file":
        out = str(outputs / "card.yaml")
    elif case == "out_under_file":
        out = str(outputs / "card.yaml" / "sub")
    elif case == "out_dangling_link":
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        out = str(tmp_path / "link")
    elif case == "cache_dir_is_file":
        cache = str(outputs / "result.json")
    elif case == "candidate_folder_is_file":
        out = str(outputs)
        (outputs / smollm2_gguf.name).write_text("in the way\n")
    check_case(capsys, outputs, ["screen", "--baseline", baseline, "--candidate", str(smollm2_gguf), "--out", out,
                                 "--cache-dir", cache, "--no-progress"], 2)
    assert not (tmp_path / "cache" / "completions").exists()


OUTPUT_FILE = {
    "score_csv_output_dir": lambda o: ["score-csv", "--self-test", "--output", str(o)],
    "card_output_under_file": lambda o: ["card", str(o / "earlier" / "record.json"), "--output",
                                         str(o / "card.yaml" / "c")],
    "calibrate_output_dir": lambda o: ["calibrate", "--input", str(o / "result.json"), "--output", str(o)],
}


@pytest.mark.parametrize("case", list(OUTPUT_FILE))
def test_bad_output_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path, case: str) -> None:
    argv = OUTPUT_FILE[case](outputs)
    if case == "score_csv_output_dir":
        argv = ["score-csv", "--input", str(outputs / "result.json"), "--output", str(outputs)]
    check_case(capsys, outputs, argv, 2, names=[str(outputs)])
