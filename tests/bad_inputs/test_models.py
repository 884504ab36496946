"""Bad model references: every one is an input error (exit 2) before any generation, naming the path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bad_inputs.helpers import check_case


def _missing(d: Path, real: Path) -> str:
    return str(d / "nope.gguf")


def _empty(d: Path, real: Path) -> str:
    (d / "empty.gguf").write_bytes(b"")
    return str(d / "empty.gguf")


def _junk(d: Path, real: Path) -> str:
    (d / "junk.gguf").write_bytes(os.urandom(4096))
    return str(d / "junk.gguf")


def _truncated(d: Path, real: Path) -> str:
    with open(real, "rb") as fh:
        (d / "cut.gguf").write_bytes(fh.read(1 << 20))
    return str(d / "cut.gguf")


def _header_only(d: Path, real: Path) -> str:
    with open(real, "rb") as fh:
        (d / "head.gguf").write_bytes(fh.read(24))
    return str(d / "head.gguf")


def _magic_only(d: Path, real: Path) -> str:
    (d / "magic.gguf").write_bytes(b"GGUF")
    return str(d / "magic.gguf")


def _text(d: Path, real: Path) -> str:
    (d / "readme.gguf").write_text("this is not a model\n")
    return str(d / "readme.gguf")


def _dir_named_gguf(d: Path, real: Path) -> str:
    (d / "folder.gguf").mkdir()
    return str(d / "folder.gguf")


def _loop(d: Path, real: Path) -> str:
    (d / "loop.gguf").symlink_to(d / "loop.gguf")
    return str(d / "loop.gguf")


def _two_link_loop(d: Path, real: Path) -> str:
    (d / "a.gguf").symlink_to(d / "b.gguf")
    (d / "b.gguf").symlink_to(d / "a.gguf")
    return str(d / "a.gguf")


def _dangling(d: Path, real: Path) -> str:
    (d / "gone.gguf").symlink_to(d / "deleted.gguf")
    return str(d / "gone.gguf")


def _under_a_file(d: Path, real: Path) -> str:
    (d / "plain").write_text("x")
    return str(d / "plain" / "m.gguf")


def _unknown_suffix(d: Path, real: Path) -> str:
    (d / "model.weights").write_bytes(b"\0" * 64)
    return str(d / "model.weights")


def _empty_folder(d: Path, real: Path) -> str:
    (d / "ckpt").mkdir()
    return str(d / "ckpt")


def _hf_bad_config(d: Path, real: Path) -> str:
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{not json")
    return str(d / "hf")


def _hf_no_weights(d: Path, real: Path) -> str:
    (d / "hfw").mkdir()
    (d / "hfw" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return str(d / "hfw")


def _dev_null_gguf(d: Path, real: Path) -> str:
    (d / "null.gguf").symlink_to("/dev/null")
    return str(d / "null.gguf")


def _unknown_scheme(d: Path, real: Path) -> str:
    return "ftp://example.invalid/model.gguf"


def _empty_string(d: Path, real: Path) -> str:
    return ""


def _zero_tensors(d: Path, real: Path) -> str:
    import struct

    # A GGUF v3 header with 0 tensors and 0 metadata keys: readable, but no model at all.
    (d / "zero.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return str(d / "zero.gguf")


CASES: dict[str, Callable[[Path, Path], str]] = {f.__name__.strip("_"): f for f in (
    _missing, _empty, _junk, _truncated, _header_only, _magic_only, _text, _dir_named_gguf, _loop,
    _two_link_loop, _dangling, _under_a_file, _unknown_suffix, _empty_folder, _hf_bad_config, _hf_no_weights,
    _dev_null_gguf, _unknown_scheme, _empty_string, _zero_tensors)}


@pytest.mark.parametrize("role", ["baseline", "candidate"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                     smollm2_gguf: Path, cache_key: Path, case: str, role: str) -> None:
    bad = CASES[case](tmp_path, smollm2_gguf)
    # The good side is a real model: a bad baseline fails first, a bad candidate after the baseline resolved.
    baseline, candidate = (bad, str(smollm2_gguf)) if role == "baseline" else (str(smollm2_gguf), bad)
    check_case(capsys, outputs, ["screen", "--baseline", baseline, "--candidate", candidate,
                                 "--out", str(outputs), "--no-progress", "--cache-dir", str(tmp_path / "cache")], 2,
               names=[bad] if bad else [])
    assert not (tmp_path / "cache").exists()  # nothing was generated


def test_same_file_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                         smollm2_gguf: Path, cache_key: Path) -> None:
    err = check_case(capsys, outputs, ["screen", "--baseline", str(smollm2_gguf), "--candidate", str(smollm2_gguf),
                                       "--out", str(outputs), "--no-progress", "--cache-dir", str(tmp_path / "c")], 2,
                     names=[str(smollm2_gguf)])
    assert "own content digest" in err


def test_different_model_family(tmp_path: Path, capsys: pytest.CaptureFixture[str], outputs: Path,
                                smollm2_gguf: Path, qwen_q4_k_m_gguf: Path, cache_key: Path) -> None:
    check_case(capsys, outputs, ["screen", "--baseline", str(qwen_q4_k_m_gguf), "--candidate", str(smollm2_gguf),
                                 "--out", str(outputs), "--no-progress", "--cache-dir", str(tmp_path / "c")], 2,
               names=[str(smollm2_gguf)])
