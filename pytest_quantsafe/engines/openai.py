"""Engine "openai": any OpenAI-compatible ``/v1/chat/completions`` server (vLLM, TGI, Ollama, llama.cpp).

Reference form: ``http://host:port/v1#model-id`` (or the ``model`` option). The
server applies the chat template; the engine sends greedy requests
(``temperature`` 0, ``seed``) with bounded concurrency, a per-request timeout, and
retries with exponential backoff on 429 / 5xx and dropped connections. A request
that times out is not retried: a hung server is reported (EngineError, exit 2)
rather than waited on again. Token counts come from the response's ``usage``; an
answer without it is refused, because ``mean_tokens_refusal`` needs the model's
own count.

Model identity: an endpoint cannot prove which weights it serves, so the record
names the endpoint's model id and the digest the user supplies (``digest=``, the
sha256 of the served weights). Without one the artifact says
``digest_pinned: false`` and its digest only covers the endpoint and model id.

Every finished completion is handed to ``on_result`` at once, in the calling
thread; when a request finally fails, the requests already in flight are allowed
to finish (or time out) and their results are delivered before the error is raised.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from pytest_quantsafe.engines.base import OnResult
from pytest_quantsafe.errors import EngineError, ModelLoadError, UsageError
from pytest_quantsafe.types import (
    Artifact,
    ArtifactFile,
    Completion,
    GenerationConfig,
    Probe,
    canonical_json,
    sha256_hex,
)

#: Version of this client's request protocol (part of the engine id and so of the cache key).
CLIENT_VERSION = "1"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _Retryable(Exception):
    """A failure worth another attempt (429, 5xx, dropped connection)."""


def parse_ref(ref: str, model: str | None = None) -> tuple[str, str | None]:
    """Return (base URL ending in /v1, model id or None) of ``http://host:port/v1#model``."""
    base, _, fragment = ref.partition("#")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"not an http(s) endpoint: {ref!r}", where=ref,
                         fix="write it as http://host:port/v1#model-id")
    base = base.rstrip("/")
    base = base.removesuffix("/chat/completions")
    return base, (fragment or model or None)


class OpenAIEngine:
    """Client for an OpenAI-compatible chat-completions endpoint."""

    name = "openai"

    def __init__(self, *, model: str | None = None, digest: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", quantization: str | None = None,
                 concurrency: int = 4, timeout: float = 120.0, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 8.0) -> None:
        if concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {concurrency}", where="engine option concurrency")
        if timeout <= 0:
            raise UsageError(f"timeout must be positive, got {timeout}", where="engine option timeout")
        if retries < 0:
            raise UsageError(f"retries must be >= 0, got {retries}", where="engine option retries")
        if digest is not None:
            digest = digest.lower().removeprefix("sha256:")
            if not _HEX64.match(digest):
                raise UsageError(f"digest {digest!r} is not a sha256 hex digest", where="engine option digest",
                                 fix="pass the sha256 of the served weights (64 hex characters)")
        self.model = model
        self.quantization = quantization or "unknown"
        self.digest = digest
        # The key comes from the environment (front doors never take it as an option), and
        # it is held only for the Authorization header: never logged, never recorded.
        self.api_key = api_key or os.environ.get(api_key_env) or None
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        #: Attempts made and retries taken, for the record and for tests.
        self.stats = {"requests": 0, "retries": 0}
        self._lock = threading.Lock()

    def engine_id(self) -> str:
        """Return "openai-http/<client version>"."""
        return f"openai-http/{CLIENT_VERSION}"

    # ------------------------------------------------------------------ HTTP

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request_once(self, url: str, body: Mapping[str, Any] | None) -> Any:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST" if data else "GET")
        with self._lock:
            self.stats["requests"] += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if exc.code in RETRY_STATUS:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                raise _Retryable(f"HTTP {exc.code}: {detail}", retry_after) from exc
            raise EngineError(f"the server answered HTTP {exc.code}: {detail}", where=url,
                              fix="check the endpoint, the model id and the request options") from exc
        except TimeoutError as exc:
            raise EngineError(f"no answer within {self.timeout:g} s", where=url,
                              fix="the server hangs or is overloaded; raise the engine option timeout "
                                  "or lower concurrency") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise EngineError(f"no answer within {self.timeout:g} s", where=url,
                                  fix="the server hangs or is overloaded; raise the engine option timeout") from exc
            if isinstance(exc.reason, ConnectionRefusedError):
                raise _Retryable(f"connection refused: {exc.reason}") from exc
            raise _Retryable(f"connection failed: {exc.reason}") from exc
        except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionError) as exc:
            raise _Retryable(f"connection dropped: {exc!r}") from exc
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise EngineError(f"the server's answer is not JSON: {raw[:200]!r}", where=url) from exc

    def _request(self, url: str, body: Mapping[str, Any] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return self._request_once(url, body)
            except _Retryable as exc:
                if attempt >= self.retries:
                    raise EngineError(f"gave up after {attempt + 1} attempts: {exc.args[0]}", where=url,
                                      fix="check that the server is up and not overloaded; raise the "
                                          "engine option retries") from exc
                delay = min(self.max_backoff, self.backoff * (2 ** attempt))
                retry_after = exc.args[1] if len(exc.args) > 1 else None
                if retry_after:
                    try:
                        delay = min(self.max_backoff, max(delay, float(retry_after)))
                    except ValueError:
                        pass
                with self._lock:
                    self.stats["retries"] += 1
                time.sleep(delay)
                attempt += 1

    # ------------------------------------------------------------------ protocol

    def resolve(self, ref: str) -> Artifact:
        """Return the endpoint's artifact: model id (checked against /models) and the user's digest."""
        base, model = parse_ref(ref, self.model)
        try:
            listing = self._request(f"{base}/models")
        except EngineError as exc:
            raise ModelLoadError(f"cannot reach the endpoint: {exc.message}", where=base,
                                 fix="start the server or correct the URL (http://host:port/v1#model-id)") from exc
        served = [str(m.get("id")) for m in listing.get("data", []) if isinstance(m, dict)] \
            if isinstance(listing, dict) else []
        if model is None:
            if len(served) != 1:
                raise UsageError(f"the endpoint serves {len(served)} models; name one", where=base,
                                 fix=f"append #model-id to the URL; served: {', '.join(served[:10]) or 'none'}")
            model = served[0]
        elif served and model not in served:
            raise ModelLoadError(f"the endpoint does not serve model {model!r}", where=f"{base}#{model}",
                                 fix=f"choose one of: {', '.join(served[:10])}")
        pinned = self.digest is not None
        sha = self.digest or sha256_hex(canonical_json({"endpoint": base, "model": model}))
        metadata = {"endpoint": base, "model_id": model, "digest_pinned": str(pinned).lower()}
        if pinned:
            metadata["weights_sha256"] = sha
        name = model.rsplit("/", 1)[-1]
        return Artifact(ref=f"{base}#{model}", format="openai", files=(ArtifactFile(f"{base}#{model}", sha, 0),),
                        quantization=self.quantization, name=name, metadata=metadata)

    def _complete(self, base: str, model: str, probe: Probe, config: GenerationConfig) -> Completion:
        messages = []
        if config.system_prompt is not None:
            messages.append({"role": "system", "content": config.system_prompt})
        messages.append({"role": "user", "content": probe.prompt})
        body = {"model": model, "messages": messages, "max_tokens": config.max_new_tokens,
                "temperature": config.temperature, "seed": config.seed, "stream": False}
        answer = self._request(f"{base}/chat/completions", body)
        where = f"{base}#{model} probe {probe.id}"
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
            finish = str(choice.get("finish_reason") or "stop")
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"the answer has no choices[0].message.content: {str(answer)[:200]}", where=where) from exc
        usage = answer.get("usage") if isinstance(answer, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise EngineError("the answer carries no usage.completion_tokens", where=where,
                              fix="use a server that reports usage (refusal length is counted in the model's tokens)")
        return Completion(probe_id=probe.id, kind=probe.kind, category=probe.category, text=text, n_tokens=tokens,
                          finish_reason=finish)

    def generate(self, artifact: Artifact, probes: Sequence[Probe], config: GenerationConfig,
                 on_result: OnResult | None = None) -> list[Completion]:
        """Return one completion per probe, in order; up to ``concurrency`` requests at a time."""
        base, model = parse_ref(artifact.ref, self.model)
        if model is None:
            raise UsageError("the artifact names no model", where=artifact.ref, fix="resolve the reference first")
        results: dict[int, Completion] = {}
        failure: BaseException | None = None
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="quantsafe-openai")
        try:
            pending: dict[Future[Completion], int] = {
                pool.submit(self._complete, base, model, probe, config): i for i, probe in enumerate(probes)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    if future.cancelled():
                        continue
                    exc = future.exception()
                    if exc is not None:
                        if failure is None:
                            failure = exc
                            for other in pending:
                                other.cancel()
                        continue
                    results[index] = future.result()
                    if on_result is not None:
                        on_result(results[index])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            if isinstance(failure, EngineError):
                failure.message += f" ({len(results)} of {len(probes)} completions finished and were delivered)"
                failure.args = (failure.message,)
            raise failure
        return [results[i] for i in range(len(probes))]

    def close(self) -> None:
        """Nothing to release: each request opens its own connection."""


#: The options of ``create`` and their types (engines/options.py types ``KEY=VALUE`` strings by it).
OPTIONS: dict[str, type] = {"model": str, "digest": str, "api_key_env": str, "quantization": str,
                            "concurrency": int, "timeout": float, "retries": int, "backoff": float,
                            "max_backoff": float, "threads": int}


def create(**options: Any) -> OpenAIEngine:
    """Return an OpenAI-compatible engine (options: model, digest, api_key_env, quantization,
    concurrency, timeout, retries, backoff, max_backoff).

    The API key is read from the environment variable ``api_key_env`` names (default
    ``OPENAI_API_KEY``); a literal ``api_key`` option is refused, so a key never sits on a
    command line. ``threads`` is accepted and ignored (the server decides its own threads),
    so one set of engine options can serve a screening that mixes engines; any other
    option is a UsageError.
    """
    options.pop("threads", None)
    if "api_key" in options:
        from pytest_quantsafe.engines.options import SECRET_OPTIONS

        raise UsageError("the openai engine takes no api_key option", where="engine option api_key",
                         fix=SECRET_OPTIONS["api_key"])
    known = set(OPTIONS) - {"threads"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"the openai engine has no option {', '.join(unknown)}", where="engine options",
                         fix=f"use {', '.join(sorted(known))}; the server applies its own chat template")
    return OpenAIEngine(**options)
