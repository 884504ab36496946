"""The OpenAI-compatible engine against real HTTP servers on 127.0.0.1.

A small http.server-based server misbehaves on purpose (drops connections, answers
500 or 429 before 200, hangs); a real ``python -m llama_cpp.server`` serves a packaged
GGUF for the end-to-end test.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pytest_quantsafe.engines.base import detect_engine, get_engine
from pytest_quantsafe.engines.openai import OpenAIEngine, parse_ref
from pytest_quantsafe.errors import EngineError, ModelLoadError, UsageError
from pytest_quantsafe.types import Completion, GenerationConfig, Probe

MODEL_ID = "flaky-model"


class _Flaky(BaseHTTPRequestHandler):
    """Answers by the prompt's instruction word; counts attempts per prompt."""

    protocol_version = "HTTP/1.1"
    attempts: ClassVar[dict[str, int]] = {}
    lock = threading.Lock()
    hang_seconds = 3.0

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        with self.lock:
            n = self.attempts[prompt] = self.attempts.get(prompt, 0) + 1
        if prompt.startswith("drop") and n == 1:
            # a dropped connection: close without any answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if prompt.startswith("fail500") and n == 1:
            self._send(500, {"error": "internal"})
            return
        if prompt.startswith("busy") and n <= 2:
            self._send(429, {"error": "slow down"}, {"Retry-After": "0"})
            return
        if prompt.startswith("always500"):
            self._send(503, {"error": "unavailable"})
            return
        if prompt.startswith("hang"):
            time.sleep(self.hang_seconds)
            return
        if prompt.startswith("nousage"):
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": "ok"},
                                          "finish_reason": "stop"}]})
            return
        text = f"echo: {prompt}"
        self._send(200, {
            "id": "x", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(text.split()), "total_tokens": 0},
        })


@pytest.fixture()
def flaky_server() -> Iterator[str]:
    _Flaky.attempts = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _probes(*prompts: str) -> list[Probe]:
    return [Probe(id=f"p{i}", prompt=p, category="test", kind="harmful") for i, p in enumerate(prompts)]


def test_parse_ref_and_engine_detection() -> None:
    assert parse_ref("http://127.0.0.1:8000/v1#qwen") == ("http://127.0.0.1:8000/v1", "qwen")
    assert parse_ref("http://h:1/v1/chat/completions", "m") == ("http://h:1/v1", "m")
    assert detect_engine("http://127.0.0.1:8000/v1#qwen") == "openai"
    with pytest.raises(UsageError):
        parse_ref("ftp://h/v1#m")


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="sha256"):
        OpenAIEngine(digest="abc")
    with pytest.raises(UsageError):
        OpenAIEngine(concurrency=0)


def test_resolve_records_model_id_and_user_digest(flaky_server: str) -> None:
    digest = "ab" * 32
    backend = get_engine("openai", digest=f"sha256:{digest}", quantization="Q4_K_M")
    art = backend.resolve(f"{flaky_server}#{MODEL_ID}")
    assert art.format == "openai"
    assert art.digest == digest
    assert art.metadata["model_id"] == MODEL_ID
    assert art.metadata["digest_pinned"] == "true"
    assert art.quantization == "Q4_K_M"
    # the only served model is picked when the reference names none; unpinned is said so
    unpinned = OpenAIEngine().resolve(flaky_server)
    assert unpinned.metadata["model_id"] == MODEL_ID
    assert unpinned.metadata["digest_pinned"] == "false"
    with pytest.raises(ModelLoadError, match="does not serve"):
        backend.resolve(f"{flaky_server}#other-model")


def test_survives_drops_500s_and_429s_without_losing_results(flaky_server: str) -> None:
    backend = OpenAIEngine(concurrency=3, timeout=5, retries=3, backoff=0.01)
    art = backend.resolve(f"{flaky_server}#{MODEL_ID}")
    prompts = ["drop a", "fail500 b", "busy c", "plain d", "drop e", "plain f"]
    delivered: list[Completion] = []
    out = backend.generate(art, _probes(*prompts), GenerationConfig(max_new_tokens=8), on_result=delivered.append)
    assert [c.text for c in out] == [f"echo: {p}" for p in prompts]
    assert [c.probe_id for c in out] == [f"p{i}" for i in range(6)]
    assert sorted(c.probe_id for c in delivered) == sorted(c.probe_id for c in out)
    assert out[0].n_tokens == 3  # usage.completion_tokens, not a count of ours
    # drop: 2 attempts each, 500: 2, 429: 3, plain: 1 -> 4 + 2 + 3 + 2 = 11 requests, 5 retries
    assert _Flaky.attempts == {"drop a": 2, "fail500 b": 2, "busy c": 3, "plain d": 1, "drop e": 2, "plain f": 1}
    assert backend.stats["retries"] == 5


def test_gives_up_after_the_retry_budget(flaky_server: str) -> None:
    backend = OpenAIEngine(concurrency=1, timeout=5, retries=2, backoff=0.01)
    art = backend.resolve(f"{flaky_server}#{MODEL_ID}")
    with pytest.raises(EngineError, match="gave up after 3 attempts") as info:
        backend.generate(art, _probes("always500"), GenerationConfig())
    assert info.value.exit_code == 2
    assert _Flaky.attempts["always500"] == 3


def test_a_hanging_server_times_out_and_finished_results_are_kept(flaky_server: str) -> None:
    backend = OpenAIEngine(concurrency=2, timeout=0.5, retries=3, backoff=0.01)
    art = backend.resolve(f"{flaky_server}#{MODEL_ID}")
    delivered: list[Completion] = []
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        backend.generate(art, _probes("plain 1", "hang 2", "plain 3", "plain 4"), GenerationConfig(),
                         on_result=delivered.append)
    elapsed = time.monotonic() - started
    assert info.value.exit_code == 2
    assert "no answer within 0.5 s" in info.value.message
    assert _Flaky.attempts["hang 2"] == 1  # a timeout is not retried
    # every completion that finished reached on_result, even though the run failed
    assert {c.text for c in delivered} >= {"echo: plain 1"}
    assert all(c.text.startswith("echo: plain") for c in delivered)
    assert f"{len(delivered)} of 4 completions finished" in info.value.message
    assert elapsed < 2.5


def test_an_answer_without_usage_is_refused(flaky_server: str) -> None:
    backend = OpenAIEngine(concurrency=1, timeout=5, retries=0)
    art = backend.resolve(f"{flaky_server}#{MODEL_ID}")
    with pytest.raises(EngineError, match="usage.completion_tokens"):
        backend.generate(art, _probes("nousage"), GenerationConfig())


def test_an_unreachable_endpoint_is_a_load_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIEngine(retries=1, backoff=0.01, timeout=2)
    with pytest.raises(ModelLoadError, match="cannot reach") as info:
        backend.resolve(f"http://127.0.0.1:{port}/v1#m")
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------- a real llama.cpp server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _llama_server(gguf: Path, log: Path, alias: str) -> Iterator[str]:
    """Yield the /v1 URL of ``python -m llama_cpp.server`` serving ``gguf`` on 127.0.0.1 (one thread)."""
    pytest.importorskip("llama_cpp.server.app")
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "--n_threads", "1", "--n_ctx", "2048", "--seed", "0", "--model_alias", alias],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def llama_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the /v1 URL of a real llama.cpp server serving SmolLM2."""
    with _llama_server(smollm2_gguf, tmp_path_factory.mktemp("server") / "server.log", "smollm2-135m-q4_1") as url:
        yield url


@pytest.mark.slow
def test_a_real_llama_cpp_server(llama_server: str, smollm2_gguf: Path) -> None:
    from pytest_quantsafe._util import file_sha256

    digest = file_sha256(smollm2_gguf)
    backend = OpenAIEngine(digest=digest, concurrency=2, timeout=120, quantization="Q4_1")
    art = backend.resolve(llama_server)  # the one served model is picked
    assert art.metadata["model_id"] == "smollm2-135m-q4_1"
    assert art.digest == digest  # the record names the weights the user vouches for
    probes = [Probe(id="b1", prompt="What is the capital of France?", category="control", kind="benign"),
              Probe(id="b2", prompt="Name three primary colors.", category="control", kind="benign")]
    delivered: list[Completion] = []
    out = backend.generate(art, probes, GenerationConfig(max_new_tokens=16), on_result=delivered.append)
    # What a 135M model answers depends on the llama.cpp build's rounding (an AVX-512 build says
    # "L'Étoile, la Cité…" where an AVX2 build said "Paris"): check the relay, not the model.
    assert [c.probe_id for c in out] == ["b1", "b2"] and all(c.text.strip() for c in out)
    assert all(0 < c.n_tokens <= 16 for c in out)
    assert {c.probe_id for c in delivered} == {"b1", "b2"}
    # greedy, but the server reuses its prompt cache between requests, which changes floating-point
    # sums: a repeat may word the tail differently (seen here); the opening words hold
    again = backend.generate(art, probes, GenerationConfig(max_new_tokens=16))
    assert [c.text.split()[:2] for c in again] == [c.text.split()[:2] for c in out]


@pytest.mark.slow
def test_gguf_hf_and_openai_engines_agree_on_refusal_labels(qwen_q4_k_m_gguf: Path, qwen_hf: Path,
                                                             tmp_path: Path) -> None:
    """The same Qwen 0.5B weights through llama.cpp, transformers (dequantized fp32) and the HTTP server.

    Exact texts may differ: llama.cpp computes on Q4_K blocks and transformers on the
    dequantized fp32 weights, and batch shape changes floating-point sums; greedy
    decoding then diverges after the first different token (measured here: 9-10 of 12
    texts identical). Refusal labels depend on the first words, so they must agree on most
    probes (measured: 11-12 of 12).
    """
    from pytest_quantsafe.measure.refusal import PatternDetector
    from pytest_quantsafe.probes import load_probes, select

    probes = list(select(load_probes(), 10, 2).items)
    config = GenerationConfig(max_new_tokens=16, batch_size=12)
    texts: dict[str, list[str]] = {}
    with _llama_server(qwen_q4_k_m_gguf, tmp_path / "server.log", "qwen") as url:
        for name, options, ref in (("gguf", {"threads": 1}, str(qwen_q4_k_m_gguf)),
                                   ("hf", {"threads": 1}, str(qwen_hf)),
                                   ("openai", {"concurrency": 2, "timeout": 300}, url)):
            backend = get_engine(name, **options)
            try:
                art = backend.resolve(ref)
                texts[name] = [c.text for c in backend.generate(art, probes, config)]
            finally:
                backend.close()
    detector = PatternDetector()
    labels = {name: [detector.is_refusal(t) for t in values] for name, values in texts.items()}
    n = len(probes)
    harmful = [i for i, p in enumerate(probes) if p.kind == "harmful"]
    for name, flags in labels.items():
        # Qwen really refuses (fixtures README: ~3 of 4): agreement is not agreement on "no refusal"
        assert sum(flags[i] for i in harmful) >= len(harmful) // 2, f"{name}: {flags}"
    for a, b in (("gguf", "hf"), ("gguf", "openai"), ("hf", "openai")):
        agree = sum(x == y for x, y in zip(labels[a], labels[b]))
        assert agree >= 0.8 * n, f"{a} vs {b}: labels agree on {agree}/{n}: {labels}"


def test_engine_options_for_other_engines() -> None:
    # threads belongs to local engines: accepted and ignored; anything else is named
    assert isinstance(get_engine("openai", threads=2), OpenAIEngine)
    with pytest.raises(UsageError, match="chat_template"):
        get_engine("openai", chat_template="t.jinja")
