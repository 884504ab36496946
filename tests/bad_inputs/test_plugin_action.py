"""Bad plugin options (pytest exit 4, a usage error, never a failing test) and bad Action inputs (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_quantsafe.action import main as action_main
from tests.bad_inputs.helpers import assert_refused, snapshot

pytest_plugins = ["pytester"]

GATE = "def test_gate(quant_safety):\n    quant_safety.assert_passes()\n"


def _plugin_args(case: str, d: Path, model: Path) -> list[str]:
    good = ["--quantsafe-baseline", str(model)]
    if case == "baseline_missing":
        return ["--quantsafe-baseline", str(d / "none.gguf"), "--quantsafe-candidate", str(model)]
    if case == "candidate_truncated":
        (d / "cut.gguf").write_bytes(model.read_bytes()[: 1 << 20])
        return [*good, "--quantsafe-candidate", str(d / "cut.gguf")]
    if case == "candidate_loop":
        (d / "l.gguf").symlink_to(d / "l.gguf")
        return [*good, "--quantsafe-candidate", str(d / "l.gguf")]
    if case == "candidate_glob_empty":
        return [*good, "--quantsafe-candidate", str(d / "dist" / "*.gguf")]
    if case == "policy_broken":
        (d / "p.yaml").write_text("name: p\nbands: {moderate: 0.9, high: 0.1}\n")
        return ["--quantsafe-manifest", str(d / "m.json"), "--quantsafe-policy", str(d / "p.yaml")]
    if case == "probes_missing":
        return [*good, "--quantsafe-candidate", str(model), "--quantsafe-probes", str(d / "none.jsonl")]
    if case == "threads_word":
        return [*good, "--quantsafe-candidate", str(model), "--quantsafe-threads", "many"]
    if case == "sign_without_out":
        return ["--quantsafe-manifest", str(d / "m.json"), "--quantsafe-sign"]
    if case == "out_is_file":
        (d / "out.txt").write_text("x")
        return ["--quantsafe-manifest", str(d / "m.json"), "--quantsafe-out", str(d / "out.txt")]
    if case == "manifest_nan":
        (d / "nan.json").write_text('{"schema_version": NaN}')
        return ["--quantsafe-manifest", str(d / "nan.json")]
    if case == "sign_key_missing":
        return ["--quantsafe-manifest", str(d / "m.json"), "--quantsafe-out", str(d / "o"),
                "--quantsafe-sign-key", str(d / "none.pem")]
    raise AssertionError(case)


PLUGIN_CASES = ["baseline_missing", "candidate_truncated", "candidate_loop", "candidate_glob_empty", "policy_broken",
                "probes_missing", "threads_word", "sign_without_out", "out_is_file", "manifest_nan",
                "sign_key_missing"]


@pytest.mark.parametrize("case", PLUGIN_CASES)
def test_bad_plugin_option_is_a_usage_error(pytester: pytest.Pytester, smollm2_gguf: Path, case: str) -> None:
    pytester.makepyfile(GATE)
    (pytester.path / "m.json").write_text("{}")
    args = _plugin_args(case, pytester.path, smollm2_gguf)
    result = pytester.runpytest(*args)
    text = result.stdout.str() + result.stderr.str()
    assert result.ret == 4, text
    assert "Traceback (most recent call last)" not in text
    assert "error[" in text


ACTION: dict[str, dict[str, str]] = {
    "no_candidates": {"QS_BASELINE": "b.gguf"},
    "no_baseline": {"QS_CANDIDATES": "c.gguf"},
    "glob_matches_nothing": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "dist/*.gguf"},
    "engine_unknown": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf", "QS_ENGINE": "warp"},
    "sign_maybe": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf", "QS_SIGN": "maybe"},
    "policy_missing": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf", "QS_POLICY": "policies/none.yaml"},
    "policy_broken": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf", "QS_POLICY": "broken.yaml"},
    "out_missing": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf"},
    "out_is_file": {"QS_BASELINE": "b.gguf", "QS_CANDIDATES": "c.gguf", "QS_OUT": "file.txt"},
    "manifest_glob_nothing": {"QS_MANIFESTS": "evidence/*.json"},
}


@pytest.mark.parametrize("case", list(ACTION))
def test_bad_action_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                          case: str) -> None:
    for name in ("QS_BASELINE", "QS_CANDIDATES", "QS_MANIFESTS", "QS_ENGINE", "QS_SIGN", "QS_POLICY", "QS_OUT",
                 "QS_PROBES", "GITHUB_ENV", "GITHUB_OUTPUT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "broken.yaml").write_text("name: x\nfail_at: NEVER\n")
    (tmp_path / "file.txt").write_text("x")
    env_file = tmp_path / "github_env"
    env_file.write_text("EARLIER=1\n")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("GITHUB_ENV", str(env_file))
    monkeypatch.chdir(tmp_path)
    env = {"QS_OUT": str(tmp_path / "qs-out"), **ACTION[case]}
    if case == "out_missing":
        env.pop("QS_OUT")
    if case == "out_is_file":
        env["QS_OUT"] = str(tmp_path / "file.txt")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    was = snapshot(tmp_path)
    code = action_main(["prepare"])
    err = capsys.readouterr().err
    assert_refused(code, err, 2)
    assert snapshot(tmp_path) == was
    assert json.dumps(env_file.read_text()) == json.dumps("EARLIER=1\n")
