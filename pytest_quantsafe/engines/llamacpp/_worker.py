"""The child-process side of the llama.cpp engine: loads a GGUF and decodes many probes at once.

``client.WorkerClient`` starts this module as ``python -m pytest_quantsafe.engines.llamacpp._worker``
and speaks JSON lines with it over stdin/stdout, so a crash inside llama.cpp (the AMX
segfault of native builds, an out-of-memory kill) ends this process, never the user's.

Requests (one JSON object per line on stdin):

- ``{"op": "load", "path", "n_threads", "n_gpu_layers", "use_extra_bufts", "flash_attn"}``
  -> ``{"event": "loaded", "info": {...}}``
- ``{"op": "generate", "items": [{"id", "prompt"}], "max_new_tokens", "batch_size", "seed",
  "early_exit", "stop_strings", "share_prefix"}`` (``early_exit``: ``null`` or a detector's
  ``PrefixRule.to_dict()``) -> one ``{"event": "result", "id", "text",
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from pytest_quantsafe.types import PrefixRule

# ----------------------------------------------------------------------------- shared prompt prefix


def _common_prefix_len(token_lists: Sequence[Sequence[int]]) -> int:
    """Return the length of the longest token prefix shared by every list."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for i in range(n):
        tok = first[i]
        if any(t[i] != tok for t in token_lists):
            return i
    return n


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


@dataclass
class _Sequence:
    """One probe being decoded in its own KV-cache sequence (``slot``)."""

    item_id: str
    prompt_tokens: list[int]
    slot: int
    n_past: int = 0
    generated: list[int] = field(default_factory=list)
    text_bytes: bytearray = field(default_factory=bytearray)
    next_token: int | None = None
    decided_refusal: bool = False
    #: Index in the current batch whose logits belong to this sequence.
    logits_index: int = -1


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
        self.ctx_shape: tuple[int, int] = (0, 0)
        self.batch = None
        self.batch_capacity = 0

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

    def ensure_context(self, n_seq: int, n_ctx_seq: int, n_batch: int) -> None:
        """(Re)create the context when the current one is too small for this generation."""
        lib = self.lib
        n_ctx_seq = ((n_ctx_seq + 255) // 256) * 256
        if self.ctx is not None and self.ctx_shape[0] >= n_seq and self.ctx_shape[1] >= n_ctx_seq \
                and self.batch_capacity >= n_batch:
            return
        self.free_context()
        params = lib.llama_context_default_params()
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * n_ctx_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        # One KV stream per sequence: a sequence's cells and attention sums never depend
        # on which other probes share the batch (batch-invariant greedy text).
        params.kv_unified = False
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_seq} x {n_ctx_seq} tokens")
        self.ctx = ctx
        self.ctx_shape = (n_seq, n_ctx_seq)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.batch_capacity = n_batch

    def free_context(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
            self.batch_capacity = 0
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
            self.ctx_shape = (0, 0)

    def close(self) -> None:
        self.free_context()
        if self.model is not None:
            self.lib.llama_model_free(self.model)
            self.model = None

    # -- generation

    def generate(self, request: dict[str, Any], send: Any) -> dict[str, Any]:
        """Decode every item, several sequences per ``llama_decode``; report each as it ends.

        Returns token and time totals. Decoding is greedy (argmax of each sequence's
        logits, first index on ties), so the request's seed has nothing to draw.
        """
        import numpy as np

        lib = self.lib
        items: list[dict[str, str]] = request["items"]
        max_new = int(request["max_new_tokens"])
        batch_size = max(1, int(request.get("batch_size") or 1))
        rule_data = request.get("early_exit")
        rule = PrefixRule.from_dict(rule_data) if rule_data else None
        stop_strings = [s.encode("utf-8") for s in request.get("stop_strings") or [] if s]
        tokenized = [(it["id"], self.tokenize(it["prompt"])) for it in items]
        if not tokenized:
            return {"n_generated": 0, "n_prompt": 0, "seconds": 0.0}
        longest = max(len(toks) for _, toks in tokenized)
        n_seq = min(batch_size, len(tokenized))
        n_batch = max(512, longest + n_seq)
        # The chat template's opening (system prompt, role markers) is the same for every
        # probe: decode it once into a spare sequence and copy its KV cache into each slot.
        shared = _common_prefix_len([toks for _, toks in tokenized]) if request.get("share_prefix", True) else 0
        shared = min(shared, min(len(toks) for _, toks in tokenized) - 1)
        if shared < 8 or len(tokenized) < 2:
            shared = 0
        self.ensure_context(n_seq + (1 if shared else 0), longest + max_new + 1, n_batch)
        assert self.batch is not None and self.ctx is not None
        memory = lib.llama_get_memory(self.ctx)
        lib.llama_memory_clear(memory, True)

        pending = list(reversed(tokenized))
        free_slots = list(reversed(range(n_seq)))
        active: list[_Sequence] = []
        batch = self.batch
        n_generated = n_prompt = 0
        started = time.perf_counter()
        prefix_seq = n_seq
        if shared:
            first = tokenized[0][1]
            for pos in range(shared):
                self._put(batch, pos, first[pos], pos, prefix_seq, pos == shared - 1)
            batch.n_tokens = shared
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the shared prompt prefix")
            n_prompt += shared

        def finish(seq: _Sequence, reason: str) -> None:
            nonlocal n_generated
            text = bytes(seq.text_bytes).decode("utf-8", errors="replace")
            send({"event": "result", "id": seq.item_id, "text": text, "n_tokens": len(seq.generated),
                  "n_prompt_tokens": len(seq.prompt_tokens), "finish_reason": reason})
            lib.llama_memory_seq_rm(memory, seq.slot, -1, -1)
            free_slots.append(seq.slot)
            active.remove(seq)

        while pending or active:
            n = 0
            # Running sequences contribute their last sampled token ...
            for seq in active:
                self._put(batch, n, seq.next_token, seq.n_past, seq.slot, True)
                seq.logits_index = n
                seq.n_past += 1
                n += 1
            # ... and free slots take new probes' whole prompts, while the batch has room.
            while pending and free_slots and n + len(pending[-1][1]) - shared <= self.batch_capacity:
                item_id, toks = pending.pop()
                seq = _Sequence(item_id=item_id, prompt_tokens=toks, slot=free_slots.pop())
                if shared:  # a whole-stream copy; llama.cpp performs it before the next decode
                    lib.llama_memory_seq_cp(memory, prefix_seq, seq.slot, -1, -1)
                for pos in range(shared, len(toks)):
                    self._put(batch, n, toks[pos], pos, seq.slot, pos == len(toks) - 1)
                    n += 1
                seq.n_past = len(toks)
                seq.logits_index = n - 1
                n_prompt += len(toks) - shared
                active.append(seq)
            batch.n_tokens = n
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (KV cache full or bad batch)")
            for seq in active:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, seq.logits_index),
                                               shape=(self.n_vocab,))
                token = int(np.argmax(logits))  # greedy: the first index of the maximum
                if lib.llama_vocab_is_eog(self.vocab, token):
                    finish(seq, "stop")
                    continue
                seq.generated.append(token)
                n_generated += 1
                seq.text_bytes += self.piece(token)
                seq.next_token = token
                if stop_strings and any(s in seq.text_bytes for s in stop_strings):
                    cut = min(seq.text_bytes.find(s) for s in stop_strings if s in seq.text_bytes)
                    del seq.text_bytes[cut:]
                    seq.generated.pop()
                    finish(seq, "stop")
                    continue
                if len(seq.generated) >= max_new:
                    finish(seq, "length")
                    continue
                if rule is not None and not seq.decided_refusal:
                    so_far = bytes(seq.text_bytes).decode("utf-8", errors="ignore")
                    if rule.is_decided_refusal(so_far):
                        seq.decided_refusal = True  # a refusal is always decoded to the end
                    elif not rule.could_become_refusal(so_far):
                        finish(seq, "early_exit")
        return {"n_generated": n_generated, "n_prompt": n_prompt, "shared_prefix": shared,
                "seconds": round(time.perf_counter() - started, 3)}

    def _put(self, batch: Any, i: int, token: int | None, pos: int, seq_id: int, logits: bool) -> None:
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
