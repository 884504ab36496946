"""The child-process side of the llama.cpp engine: loads a GGUF and decodes many probes at once.

``client.WorkerClient`` starts this module as ``python -m pytest_quantsafe.engines.llamacpp._worker``
and speaks JSON lines with it over stdin/stdout, so a crash inside llama.cpp (the AMX
segfault of native builds, an out-of-memory kill) ends this process, never the user's.

Requests (one JSON object per line on stdin):

- ``{"op": "load", "path", "n_threads", "n_gpu_layers", "use_extra_bufts", "flash_attn"}``
  -> ``{"event": "loaded", "info": {...}}``
- ``{"op": "generate", "items": [{"id", "prompt"}], "max_new_tokens", "batch_size", "group_size",
  "seed", "early_exit", "stop_strings", "share_prefix"}`` (``early_exit``: ``null`` or a detector's
  ``PrefixRule.to_dict()``; items decoded in consecutive groups of ``group_size``, see ``_decode``) -> one ``{"event": "result", "id", "text",
  "n_tokens", "n_prompt_tokens", "finish_reason"}`` per item as it finishes, then
  ``{"event": "done", "stats": {...}}``
- ``{"op": "close"}`` -> the process exits.

Any failure the worker can report is ``{"event": "error", "message", "kind"}``.
``python -m pytest_quantsafe.engines.llamacpp._worker quantize IN OUT FTYPE`` quantizes
a GGUF file (used by ``zoo/ladder.py``), in a child process for the same reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from typing import IO, Any

from pytest_quantsafe.engines.llamacpp._decode import GroupDecoder, GroupShape, group_shape, groups
from pytest_quantsafe.types import PrefixRule

# ----------------------------------------------------------------------------- protocol


class _Channel:
    """JSON lines on a private copy of stdout; fd 1 is pointed at stderr so that stray
    prints from C code can never corrupt the protocol stream."""

    def __init__(self) -> None:
        sys.stdout.flush()
        private = os.dup(1)
        os.dup2(2, 1)
        self._out: IO[str] = os.fdopen(private, "w", buffering=1, encoding="utf-8")

    def send(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message, ensure_ascii=False) + "\n")
        self._out.flush()


# ----------------------------------------------------------------------------- model


class _Model:
    """A loaded GGUF model plus a context sized for the current generation."""

    def __init__(self, request: dict[str, Any]) -> None:
        import llama_cpp  # heavy: only in the worker

        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        self._silence_logs()
        params = llama_cpp.llama_model_default_params()
        n_gpu_layers = request.get("n_gpu_layers")
        if n_gpu_layers is None:
            n_gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        params.n_gpu_layers = int(n_gpu_layers)
        # Extra buffer types (AMX, weight repacking) are where the native-build segfault
        # lives, and repacked kernels switch between gemv and gemm with the batch shape;
        # off by default so a sequence's numbers do not depend on its batch neighbours.
        params.use_extra_bufts = bool(request.get("use_extra_bufts", False))
        self.path = request["path"]
        model = llama_cpp.llama_model_load_from_file(self.path.encode("utf-8"), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_threads = int(request.get("n_threads") or 1)
        self.flash_attn = request.get("flash_attn", True)
        self.n_gpu_layers = int(n_gpu_layers)
        self.ctx = None
        self.ctx_shape: GroupShape | None = None
        self.batch = None

    def _silence_logs(self) -> None:
        lib = self.lib

        @lib.llama_log_callback
        def _errors_only(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - C callback
            if level == 4:  # GGML_LOG_LEVEL_ERROR: kept on stderr, which the parent shows on a crash
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        # Keep a reference so the callback outlives this call.
        self._log_cb = _errors_only
        lib.llama_log_set(self._log_cb, ctypes.c_void_p())

    def info(self) -> dict[str, Any]:
        lib = self.lib
        return {
            "llama_cpp_version": getattr(lib, "__version__", "unknown"),
            "gpu_offload": bool(lib.llama_supports_gpu_offload()),
            "n_gpu_layers": self.n_gpu_layers,
            "n_threads": self.n_threads,
            "n_vocab": self.n_vocab,
            "n_ctx_train": int(lib.llama_model_n_ctx_train(self.model)),
        }

    # -- tokens

    def tokenize(self, text: str) -> list[int]:
        lib = self.lib
        data = text.encode("utf-8")
        bos = lib.llama_vocab_bos(self.vocab)
        add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        if add_bos and bos >= 0 and data.startswith(self.piece(bos, special=True)):
            add_bos = False  # the chat template already wrote the BOS text
        capacity = len(data) + 8
        buf = (lib.llama_token * capacity)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, True)
        if n < 0:
            capacity = -n
            buf = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, True)
        if n < 0:
            raise RuntimeError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return bytes(buf.raw[:n])

    # -- context

    def ensure_context(self, shape: GroupShape) -> bool:
        """Make the context ``shape`` asks for; return True when a new one was created.

        The shape must match exactly, not only be large enough: where the KV cache puts a
        sequence's cells, and so its rounding, depends on the cache's size.
        """
        lib = self.lib
        if self.ctx is not None and self.ctx_shape == shape:
            return False
        self.free_context()
        params = lib.llama_context_default_params()
        params.n_seq_max = shape.n_seq
        params.n_ctx = shape.n_ctx
        params.n_batch = shape.n_batch
        params.n_ubatch = shape.n_batch
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        # One KV stream for all sequences: llama.cpp splits a batch over separate streams
        # into one micro-batch per run of consecutive sequence ids, so with slots freed and
        # refilled in any order a step would be several passes over the weights.
        params.kv_unified = True
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {shape.n_ctx} tokens for {shape.n_seq} "
                               "sequences")
        self.ctx = ctx
        self.ctx_shape = shape
        self.batch = lib.llama_batch_init(shape.n_batch, 0, 1)
        return True

    def free_context(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
            self.ctx_shape = None

    def close(self) -> None:
        self.free_context()
        if self.model is not None:
            self.lib.llama_model_free(self.model)
            self.model = None

    # -- generation

    def generate(self, request: dict[str, Any], send: Any) -> dict[str, Any]:
        """Decode every item in fixed groups (``_decode``); report each as it ends; return the totals.

        Decoding is greedy (argmax of each sequence's logits, first index on ties), so the
        request's seed has nothing to draw.
        """
        items: list[dict[str, str]] = request["items"]
        max_new = int(request["max_new_tokens"])
        batch_size = max(1, int(request.get("batch_size") or 1))
        group_size = max(batch_size, int(request.get("group_size") or batch_size))
        rule_data = request.get("early_exit")
        decoder = GroupDecoder(self, max_new=max_new, batch_size=batch_size,
                               rule=PrefixRule.from_dict(rule_data) if rule_data else None,
                               stop_strings=[s.encode("utf-8") for s in request.get("stop_strings") or [] if s],
                               send=send)
        tokenized = [(it["id"], self.tokenize(it["prompt"])) for it in items]
        started = time.perf_counter()
        for members in groups(len(tokenized), group_size):
            group = [tokenized[i] for i in members]
            shape = group_shape([toks for _, toks in group], batch_size=batch_size, max_new=max_new,
                                share_prefix=bool(request.get("share_prefix", True)))
            decoder.run(group, shape)
        totals = decoder.stats.to_dict()
        totals["wall_seconds"] = round(time.perf_counter() - started, 3)
        return totals

    def put(self, batch: Any, i: int, token: int | None, pos: int, seq_id: int, logits: bool) -> None:
        """Write token ``i`` of ``batch``: one sequence, optionally asking for its logits."""
        batch.token[i] = int(token if token is not None else 0)
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = 1 if logits else 0


# ----------------------------------------------------------------------------- entry points


def serve(channel: _Channel, stdin: IO[str]) -> int:
    """Answer requests from ``stdin`` until "close" or end of input; return the exit status."""
    model: _Model | None = None
    for line in stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "load":
                if model is not None:
                    model.close()
                    model = None
                model = _Model(request)
                channel.send({"event": "loaded", "info": model.info()})
            elif op == "close":
                break
            elif op not in ("count_tokens", "generate") or model is None:
                raise RuntimeError(f"unknown op {op!r}" if op not in ("count_tokens", "generate") else f"{op} before load")
            elif op == "count_tokens":
                channel.send({"event": "counts", "counts": [len(model.tokenize(p)) for p in request["prompts"]],
                              "n_ctx_train": model.info()["n_ctx_train"]})
            else:
                channel.send({"event": "done", "stats": model.generate(request, channel.send)})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises EngineError
            channel.send({"event": "error", "kind": type(exc).__name__, "message": str(exc)})
    if model is not None:
        model.close()
    return 0


def quantize(source: str, target: str, ftype: int, n_threads: int = 0) -> int:
    """Return llama.cpp's status for quantizing GGUF ``source`` into ``target`` as ``ftype``."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(n_threads)
    return int(llama_cpp.llama_model_quantize(source.encode("utf-8"), target.encode("utf-8"),
                                              ctypes.byref(params)))


def main(argv: list[str] | None = None) -> int:
    """Run the worker: ``serve`` (default) or ``quantize IN OUT FTYPE [THREADS]``."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "quantize":
        rc = quantize(args[1], args[2], int(args[3]), int(args[4]) if len(args) > 4 else 0)
        return 0 if rc == 0 else 1
    channel = _Channel()
    return serve(channel, sys.stdin)


if __name__ == "__main__":
    raise SystemExit(main())
