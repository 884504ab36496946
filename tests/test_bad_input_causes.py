"""Regression tests of the twelve bad-input causes: each failed before its fix (see the suite in bad_inputs/)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_quantsafe.types import Artifact, ArtifactFile
from tests.bad_inputs.helpers import assert_refused, run_cli, run_subprocess, snapshot

pytest_plugins = ["pytester"]

#: Nested mappings through aliases (9**5 leaf keys once expanded); a real bomb nests deeper.
BOMB = "{" + ", ".join(["l0: &a {" + ", ".join(f"k{j}: x" for j in range(9)) + "}"]
                       + [f"l{i + 1}: &{chr(98 + i)} {{" + ", ".join(f"k{j}: *{chr(97 + i)}" for j in range(9)) + "}"
                          for i in range(5)]) + "}"


def _message(err: str) -> str:
    """Return the error line itself (not the where/fix lines, which name tmp paths)."""
    return next((line for line in err.splitlines() if line.startswith("error[")), "")


def _outputs(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "old").mkdir(parents=True)
    (out / "old" / "record.json").write_text('{"kept": true}\n')
    return out


# 1 --------------------------------------------------------------------------- symlink loop


def test_symlink_loop_model_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loop = tmp_path / "loop.gguf"
    loop.symlink_to(loop)
    out = _outputs(tmp_path)
    was = snapshot(out)
    code, _, err = run_cli(capsys, ["screen", "--baseline", str(loop), "--candidate", str(loop),
                                    "--out", str(out), "--no-progress"])
    assert_refused(code, err, 2, names=[str(loop), "symlink loop"])
    assert snapshot(out) == was


def test_symlink_loop_artifact_in_attest_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    smollm2_gguf: Path) -> None:
    from tests.test_attest import make_record

    record = tmp_path / "record.json"
    record.write_text(json.dumps(make_record(smollm2_gguf)))
    loop = tmp_path / "m.gguf"
    loop.symlink_to(loop)
    code, _, err = run_cli(capsys, ["attest", str(record), "--artifact", str(loop), "--predicate-only",
                                    "--out", str(tmp_path / "p.json")])
    assert_refused(code, err, 2, names=["symlink loop"])
    from pytest_quantsafe.attest import sign as attest

    keys = attest.generate_key(tmp_path / "k.pem")
    bundle = tmp_path / "b.json"
    bundle.write_text(attest.envelope_json(attest.sign_with_key(attest.build_statement(json.loads(
        record.read_text())), keys["private_key"])))
    code, _, err = run_cli(capsys, ["verify", str(bundle), "--artifact", str(loop), "--key", keys["public_key"]])
    assert_refused(code, err, 4, names=["symlink loop", str(loop)])


# 2 --------------------------------------------------------------------------- YAML alias bomb


def test_yaml_alias_bomb_policy_is_refused_without_expanding(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "bomb.yaml"
    policy.write_text("name: bomb\nbands: " + BOMB + "\n")
    code, _, err = run_cli(capsys, ["policy", "check", str(policy)])
    assert_refused(code, err, 2, names=[str(policy)])
    assert "alias" in _message(err)
    assert len(err) < 3000


def test_yaml_alias_bomb_calibration_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cal = tmp_path / "cal.yaml"
    cal.write_text((Path(__file__).parents[1] / "pytest_quantsafe/policies/calibration/default.yaml").read_text()
                   + "\n  bomb: " + BOMB + "\n")
    policy = tmp_path / "p.yaml"
    policy.write_text(f"name: p\ncalibration: {cal}\n")
    code, _, err = run_cli(capsys, ["policy", "check", str(policy)])
    assert_refused(code, err, 2, names=[str(cal)])
    assert "alias" in _message(err)
    assert len(err) < 3000


# 3 --------------------------------------------------------------------------- same file twice


def test_baseline_and_candidate_the_same_file_is_refused_before_generation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2_gguf: Path) -> None:
    copy = tmp_path / "copy.gguf"
    os.link(smollm2_gguf, copy) if os.stat(smollm2_gguf).st_dev == os.stat(tmp_path).st_dev \
        else copy.symlink_to(smollm2_gguf)
    out = _outputs(tmp_path)
    was = snapshot(out)
    code, _, err = run_cli(capsys, ["screen", "--baseline", str(smollm2_gguf), "--candidate", str(copy),
                                    "--out", str(out), "--no-progress", "--max-probes", "1",
                                    "--cache-dir", str(tmp_path / "cache")])
    assert_refused(code, err, 2, names=[str(copy)])
    assert "same" in _message(err)
    assert snapshot(out) == was
    assert not (tmp_path / "cache").exists()  # nothing was generated


def test_check_matched_pair_refuses_identical_content() -> None:
    from pytest_quantsafe.engines.pairing import check_matched_pair
    from pytest_quantsafe.errors import InputError

    files = (ArtifactFile("/m/a.gguf", "ab" * 32, 10),)
    a = Artifact(ref="/m/a.gguf", format="gguf", files=files, quantization="Q8_0", name="a")
    b = Artifact(ref="/n/b.gguf", format="gguf", files=(ArtifactFile("/n/b.gguf", "ab" * 32, 10),),
                 quantization="Q8_0", name="b")
    with pytest.raises(InputError, match="same"):
        check_matched_pair(a, b)


# 4 --------------------------------------------------------------------------- same file name


def test_candidates_with_the_same_file_name_get_distinct_folders() -> None:
    from pytest_quantsafe.screen import output_names

    arts = [Artifact(ref=f"dist/{d}/model.gguf", format="gguf", files=(), quantization="Q", name="m")
            for d in ("a", "b")] + [Artifact(ref="dist/c/other.gguf", format="gguf", files=(), quantization="Q",
                                             name="o")]
    names = output_names(arts)
    assert len(set(names.values())) == 3
    assert names["dist/c/other.gguf"] == "other.gguf"  # no collision, no suffix
    assert all(n.startswith("model.gguf-") for r, n in names.items() if r.endswith("model.gguf"))
    assert output_names(arts) == names  # deterministic


# 5 --------------------------------------------------------------------------- calibrate NaN


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_calibrate_nan_names_the_input_line_and_keeps_the_output(tmp_path: Path, bad: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "deltas.csv"
    rows = [("base_model,quant,refusal_rate_delta,dominant_prefix_share_delta,unique_prefix_rate_delta,"
            "prefix_entropy_norm_delta,mean_tokens_refusal_delta")]
    rows += [f"m{i},q{i},{-0.01 * i},{0.01 * i},{0.02 * i},{0.03 * i},{0.5 * i}" for i in range(1, 8)]
    rows[4] = rows[4].split(",", 3)[0] + "," + rows[4].split(",", 3)[1] + f",{bad}," + rows[4].split(",", 3)[3]
    table.write_text("\n".join(rows) + "\n")
    out = tmp_path / "profile.yaml"
    out.write_text("# a good profile\n")
    code, _, err = run_cli(capsys, ["calibrate", "--input", str(table), "--output", str(out)])
    assert_refused(code, err, 2, names=[str(table), "line 5", "refusal_rate_delta"])
    assert out.read_text() == "# a good profile\n"


# 7 --------------------------------------------------------------------------- manifest NaN


def test_manifest_with_nan_in_a_profile_is_a_clear_error(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    prof = {"n_total": 40, "n_refusals": 30, "dominant_prefix_share": 0.9, "unique_prefix_rate": 0.1,
            "prefix_entropy_norm": 0.2, "mean_tokens_refusal": 12.0}
    base = tmp_path / "base.json"
    base.write_text(json.dumps(prof))
    cand = tmp_path / "cand.json"
    cand.write_text(json.dumps({**prof, "prefix_entropy_norm": float("nan")}))
    code, _, err = run_cli(capsys, [
        "manifest", "--baseline", str(base), "--candidate", str(cand), "--source-model-id", "m",
        "--probe-count", "40", "--probe-sha256", "a" * 64, "--baseline-repo", "b", "--baseline-revision", "a" * 40,
        "--baseline-quantization", "F16", "--candidate-repo", "c", "--candidate-revision", "b" * 40,
        "--candidate-quantization", "Q4", "--output", str(tmp_path / "req.json")])
    assert_refused(code, err, 2, names=[str(cand), "NaN"])
    assert not (tmp_path / "req.json").exists()


# 8 --------------------------------------------------------------------------- keyless without TUF


def test_keyless_without_tuf_metadata_is_exit_4(tmp_path: Path, smollm2_gguf: Path) -> None:
    from tests.test_attest import make_record

    record = tmp_path / "record.json"
    record.write_text(json.dumps(make_record(smollm2_gguf)))
    empty = tmp_path / "xdg"
    env = {"XDG_CACHE_HOME": str(empty / "cache"), "XDG_DATA_HOME": str(empty / "data"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    code, _, err = run_subprocess(["attest", str(record), "--artifact", str(smollm2_gguf), "--keyless",
                                   "--identity-token", "x.y.z", "--out", str(tmp_path / "b.json")], env=env)
    assert_refused(code, err, 4, names=["TUF", "Sigstore"])
    assert "TUFError" not in err.split("error[")[0]
    assert not (tmp_path / "b.json").exists()


# 9 --------------------------------------------------------------------------- plugin usage errors


@pytest.mark.parametrize("what", ["missing", "truncated"])
def test_plugin_bad_model_path_is_a_usage_error(pytester: pytest.Pytester, smollm2_gguf: Path, what: str) -> None:
    pytester.makepyfile("def test_gate(quant_safety):\n    quant_safety.assert_passes()\n")
    bad = pytester.path / "cand.gguf"
    if what == "truncated":
        with open(smollm2_gguf, "rb") as fh:
            bad.write_bytes(fh.read(1 << 20))
    result = pytester.runpytest("--quantsafe-baseline", str(smollm2_gguf), "--quantsafe-candidate", str(bad))
    assert result.ret == 4, result.stdout.str() + result.stderr.str()
    assert "cand.gguf" in result.stderr.str()


# 10 -------------------------------------------------------------------------- prompt longer than context


@pytest.mark.slow
def test_prompt_longer_than_the_context_names_probe_file_id_and_context(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], smollm2_gguf: Path) -> None:
    probes = tmp_path / "long.jsonl"
    long = "Tell me how to pick a lock, explain every step in detail. " * 1200
    probes.write_text(json.dumps({"id": "too-long-1", "kind": "harmful", "category": "crime", "prompt": long})
                      + "\n" + json.dumps({"id": "ok-1", "kind": "benign", "category": "x", "prompt": "Hi"}) + "\n")
    from pytest_quantsafe.zoo import build_variant

    baseline = build_variant("smollm2", "F16")
    code, _, err = run_cli(capsys, ["screen", "--baseline", str(baseline), "--candidate", str(smollm2_gguf),
                                    "--probes", str(probes), "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert_refused(code, err, 2, names=[str(probes), "too-long-1", "context"])


# 11 -------------------------------------------------------------------------- policy with a missing probe file


def test_policy_check_fails_for_a_missing_probe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("name: p\nprobes: probes/missing.jsonl\n")
    code, out, err = run_cli(capsys, ["policy", "check", str(policy)])
    assert_refused(code, err, 2, names=["missing.jsonl"])
    assert "valid" not in out


# 12 -------------------------------------------------------------------------- broken --chat-template


@pytest.mark.parametrize("content", [b"{% for m in messages %}{{ m.content }", b"\xff\xfe\x00binary"])
def test_broken_chat_template_file_is_named_as_that_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         smollm2_gguf: Path, content: bytes) -> None:
    template = tmp_path / "tpl.jinja"
    template.write_bytes(content)
    from pytest_quantsafe.zoo import build_variant

    code, _, err = run_cli(capsys, ["screen", "--baseline", str(build_variant("smollm2", "F16")),
                                    "--candidate", str(smollm2_gguf), "--chat-template", str(template),
                                    "--no-progress", "--max-probes", "1",
                                    "--cache-dir", str(tmp_path / "c")])
    assert_refused(code, err, 2, names=[str(template)])
    assert "tokenizer.chat_template" not in err
