"""Engine options from every front door: typed by the engine's table, unknown keys exit 2, no secret as an option.

The endpoint test runs the real CLI against a real HTTP server on 127.0.0.1 that
demands a Bearer key: the key travels only in the environment variable ``api_key_env``
names, the record says ``digest_pinned: true``, and the key is in no file and no output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pytest_quantsafe import action
from pytest_quantsafe.engines.openai import OpenAIEngine
from pytest_quantsafe.engines.options import option_table, parse_engine_options, split_option_list
from pytest_quantsafe.errors import ModelLoadError, UsageError, from_exception
from tests.test_action import parse_file_command

pytest_plugins = ["pytester"]

SECRET = "sk-quantsafe-test-5f1d2c9b7a"
DIGEST = "cd" * 32


def test_values_are_typed_by_the_engine_table() -> None:
    got = parse_engine_options("openai", ["digest=" + DIGEST, "concurrency=8", "timeout=2.5", "api_key_env=MY_KEY"])
    assert got == {"digest": DIGEST, "concurrency": 8, "timeout": 2.5, "api_key_env": "MY_KEY"}
    assert parse_engine_options("gguf", ["early_exit=off", "threads=3", "flash_attn=TRUE"]) == {
        "early_exit": False, "threads": 3, "flash_attn": True}
    # "auto": a key any engine has; typed by that engine
    assert parse_engine_options("auto", ["digest=x", "n_gpu_layers=0"]) == {"digest": "x", "n_gpu_layers": 0}
    assert set(option_table("hf")) >= {"device", "dtype", "trust_remote_code"}


@pytest.mark.parametrize(("engine", "items", "message"), [
    ("gguf", ["digest=abc"], "the gguf engine has no option 'digest'"),
    ("openai", ["concurrency=many"], "concurrency must be an integer"),
    ("gguf", ["early_exit=maybe"], "early_exit must be true or false"),
    ("hf", ["dtype"], "is not KEY=VALUE"),
    ("openai", ["api_key=" + SECRET], "api_key is refused"),
])
def test_bad_options_are_usage_errors_naming_key_and_fix(engine: str, items: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_engine_options(engine, items)
    assert info.value.exit_code == 2 and info.value.fix
    if "no option" in message:
        assert "accepts:" in info.value.fix and "threads" in info.value.fix
    if "api_key" in message:
        assert "api_key_env" in info.value.fix and SECRET not in info.value.diagnostics()


def test_list_forms_of_the_environment_and_the_action_input() -> None:
    assert split_option_list("digest=a, concurrency=2") == ["digest=a", "concurrency=2"]
    assert split_option_list("chat_template=a,b.jinja\nthreads=2\n") == ["chat_template=a,b.jinja", "threads=2"]
    assert split_option_list("  \n") == []


def test_the_openai_engine_reads_its_key_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", SECRET)
    assert OpenAIEngine(api_key_env="MY_KEY")._headers()["Authorization"] == f"Bearer {SECRET}"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert "Authorization" not in OpenAIEngine()._headers()


def test_third_party_exceptions_become_typed_errors() -> None:
    missing = from_exception(ModuleNotFoundError("No module named 'accelerate'", name="accelerate"), "demo")
    assert isinstance(missing, ModelLoadError) and missing.fix == "pip install 'pytest-quantsafe[hf]'"
    odd = from_exception(ValueError("bad shape"), "screening x")
    assert odd.where == "screening x" and "ValueError" in odd.message and odd.fix


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False, env=env)


def test_cli_unknown_engine_option_exits_2_without_traceback(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    proc = _run_cli("screen", "--baseline", str(model), "--candidate", str(model), "--engine", "gguf",
                    "--engine-option", "bogus=1")
    assert proc.returncode == 2, proc.stderr
    assert "the gguf engine has no option 'bogus'" in proc.stderr and "threads" in proc.stderr
    assert "Traceback" not in proc.stderr
    secret = _run_cli("demo", "--engine-option", f"api_key={SECRET}")
    assert secret.returncode == 2 and "api_key_env" in secret.stderr and "Traceback" not in secret.stderr


def test_plugin_option_environment_and_ini(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(quant_safety):\n    pass\n")
    bad = pytester.runpytest("--quantsafe-baseline", "b.gguf", "--quantsafe-candidate", "c.gguf",
                             "--quantsafe-engine", "gguf", "--quantsafe-engine-option", "digest=abc")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*the gguf engine has no option 'digest'*", "*accepts:*"])
    os.environ["QUANTSAFE_ENGINE_OPTIONS"] = "concurrency=x"
    try:
        env = pytester.runpytest("--quantsafe-baseline", "http://127.0.0.1:9/v1#m",
                                 "--quantsafe-candidate", "http://127.0.0.1:9/v1#n")
    finally:
        del os.environ["QUANTSAFE_ENGINE_OPTIONS"]
    assert env.ret == pytest.ExitCode.USAGE_ERROR
    env.stderr.fnmatch_lines(["*concurrency must be an integer*"])
    pytester.makeini("[pytest]\nquantsafe_engine_options =\n    api_key=abc\n")
    ini = pytester.runpytest("--quantsafe-baseline", "http://127.0.0.1:9/v1#m",
                             "--quantsafe-candidate", "http://127.0.0.1:9/v1#n")
    assert ini.ret == pytest.ExitCode.USAGE_ERROR
    ini.stderr.fnmatch_lines(["*api_key is refused*"])


def test_action_prepare_checks_engine_options_and_masks_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    outputs, env_file = tmp_path / "outputs", tmp_path / "env"
    for name, value in {"QS_BASELINE": "http://127.0.0.1:9/v1#a", "QS_CANDIDATES": "http://127.0.0.1:9/v1#b",
                        "QS_ENGINE": "openai", "QS_OUT": str(tmp_path / "out"), "QS_API_KEY": SECRET,
                        "QS_ENGINE_OPTIONS": f"digest={DIGEST}\napi_key_env=MY_KEY",
                        "GITHUB_OUTPUT": str(outputs), "GITHUB_ENV": str(env_file)}.items():
        monkeypatch.setenv(name, value)
    assert action.main(["prepare"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"::add-mask::{SECRET}"
    assert SECRET not in outputs.read_text() and SECRET not in env_file.read_text()
    assert parse_file_command(outputs.read_text())["api-key-env"] == "MY_KEY"
    assert parse_file_command(env_file.read_text())["QUANTSAFE_ENGINE_OPTIONS"] == \
        f"digest={DIGEST}\napi_key_env=MY_KEY"
    monkeypatch.setenv("QS_ENGINE_OPTIONS", "bogus=1")
    assert action.main(["prepare"]) == 2
    assert "the openai engine has no option 'bogus'" in capsys.readouterr().out


class _KeyedServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers only with the right Bearer key (401 otherwise)."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        self.seen.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {SECRET}":
            self._send(401, {"error": "missing or wrong key"})
            return False
        return True

    def do_GET(self) -> None:
        if self._authorised():
            self._send(200, {"object": "list", "data": [{"id": "base"}, {"id": "cand"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorised():
            return
        text = "I'm sorry, but I can't help with that." if "how" in body["messages"][-1]["content"].lower() \
            else "Here is an answer."
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": len(text.split())}})


@pytest.fixture()
def keyed_server() -> Iterator[str]:
    _KeyedServer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedServer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_cli_screens_a_keyed_endpoint_with_a_pinned_digest(keyed_server: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "MY_KEY": SECRET, "QUANTSAFE_CACHE": str(tmp_path / "cache")}
    proc = _run_cli("screen", "--baseline", f"{keyed_server}#base", "--candidate", f"{keyed_server}#cand",
                    "--engine", "openai", "--engine-option", f"digest={DIGEST}", "--engine-option",
                    "api_key_env=MY_KEY", "--engine-option", "concurrency=2", "--max-probes", "6",
                    "--no-progress", "--out", str(out), env=env)
    assert proc.returncode in (0, 1, 3), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _KeyedServer.seen and set(_KeyedServer.seen) == {f"Bearer {SECRET}"}
    record = json.loads(next(out.glob("*/record.json")).read_text())
    assert record["candidate"]["artifact"]["metadata"]["digest_pinned"] == "true"
    for path in [*out.rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8", errors="replace"), path
    assert SECRET not in proc.stdout + proc.stderr
    # without the key in the environment the server refuses, and the CLI says so (exit 2, no traceback)
    denied = _run_cli("screen", "--baseline", f"{keyed_server}#base", "--candidate", f"{keyed_server}#cand",
                      "--engine", "openai", "--engine-option", "api_key_env=NOT_SET_ANYWHERE", "--max-probes", "6",
                      "--no-progress", env={**env, "QUANTSAFE_CACHE": str(tmp_path / "cache2")})
    assert denied.returncode == 2 and "401" in denied.stderr and "Traceback" not in denied.stderr
