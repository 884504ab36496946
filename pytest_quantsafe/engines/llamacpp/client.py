"""The parent side of the llama.cpp worker: starts ``_worker`` as a child process and speaks
JSON lines with it, turning every way it can fail (death, silence, a reported error)
into ``EngineError``, with the tail of its stderr when it died.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

from pytest_quantsafe.errors import EngineError

__all__ = ["WorkerClient"]


class WorkerClient:
    """The child process running ``_llamacpp_worker``; every failure of it is an EngineError."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker; closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_quantsafe.engines.llamacpp._worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, encoding="utf-8", bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.loaded_path: str | None = None
        self.info: dict[str, Any] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        """Return the worker's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Return True while the worker process runs."""
        return self.proc.poll() is None

    def send(self, request: Mapping[str, Any]) -> None:
        """Write one request line; a dead worker is an EngineError."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise self._died(f"sending {request.get('op')!r}") from exc

    def receive(self, doing: str) -> dict[str, Any]:
        """Return the next event from the worker; death, hang or a reported error is an EngineError."""
        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            self.kill()
            raise EngineError(f"the llama.cpp worker was silent for {self.timeout_s:.0f} s while {doing}; stopped it",
                              fix="raise the engine option timeout_s, lower batch_size or max_new_tokens") from None
        if line is None:
            raise self._died(doing)
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == "error":
            raise EngineError(f"llama.cpp failed while {doing}: {event.get('kind')}: {event.get('message')}",
                              fix="check the model file and the engine options")
        return event

    def _died(self, doing: str) -> EngineError:
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        self._stderr.seek(0)
        tail = self._stderr.read()[-1500:].decode("utf-8", errors="replace").strip()
        detail = f"; its last words: {tail}" if tail else ""
        return EngineError(
            f"the llama.cpp worker process {how} while {doing}{detail}",
            fix="if it was SIGSEGV on a CPU with AMX, reinstall llama-cpp-python built portable "
            "(CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\", as scripts/setup.sh "
            "does) and keep use_extra_bufts off; if it was SIGKILL, check memory; completed generations are kept",
        )

    def kill(self) -> None:
        """Stop the worker now."""
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Ask the worker to exit; kill it when it does not."""
        if self.alive():
            try:
                self.send({"op": "close"})
                self.proc.wait(timeout=10)
            except (EngineError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()
