"""The batched decoder of the llama.cpp worker: fixed groups of probes, each a pure function of its prompts.

A generation's items are cut, in the order given, into groups of ``group_size``. Each group
is decoded from an empty KV cache in a context whose shape depends only on that group, at
most ``batch_size`` sequences at a time; a slot freed by a finished sequence takes the
group's next probe (continuous refill). Every ``llama_decode`` call is one micro-batch
(one KV stream, ``n_ubatch`` sized for the group's first wave), so each step is one pass
over the weights.

Why groups: a sequence's floating point depends on its batch neighbours (llama.cpp's
matrix kernels take one path for one row and others for several — llamafile's tiled
GEMM for Q8_0/Q5_0/Q4_0, the tiled K-quant GEMM from 8 rows, repacked weights in groups
of 4 rows — and attention reads the KV cells where the schedule put them). Nothing
crosses a group boundary, so the same group gives byte-identical texts in any run, and a
resumed run that regenerates whole unfinished groups reproduces the uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_quantsafe.types import PrefixRule

#: Prompt cells per sequence are reserved in steps of this many tokens, so that most groups
#: share one context shape (a new shape means a new context).
PROMPT_STEP = 256
#: Micro-batches are sized in steps of this many tokens (llama.cpp's own default batch).
UBATCH_STEP = 512


def common_prefix_len(token_lists: Sequence[Sequence[int]]) -> int:
    """Return the length of the longest token prefix shared by every list."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists)
    for i in range(n):
        tok = first[i]
        if any(t[i] != tok for t in token_lists):
            return i
    return n


def groups(n_items: int, group_size: int) -> list[range]:
    """Return the index ranges of consecutive groups of ``group_size`` items (the last may be shorter)."""
    size = max(1, group_size)
    return [range(start, min(start + size, n_items)) for start in range(0, n_items, size)]


def _round_up(n: int, step: int) -> int:
    return ((n + step - 1) // step) * step


@dataclass(frozen=True)
class GroupShape:
    """The context a group is decoded in: a pure function of the group's prompts and the settings."""

    n_seq: int
    n_ctx: int
    n_batch: int
    shared: int


def group_shape(token_lists: Sequence[Sequence[int]], *, batch_size: int, max_new: int,
                share_prefix: bool) -> GroupShape:
    """Return the context shape and shared-prefix length for one group of tokenized prompts."""
    shared = common_prefix_len(token_lists) if share_prefix and len(token_lists) > 1 else 0
    shared = min(shared, min(len(t) for t in token_lists) - 1)
    if shared < 8:
        shared = 0
    width = min(batch_size, len(token_lists))
    suffix = max(len(t) for t in token_lists) - shared
    # One KV stream: the shared prefix once, then each live sequence's own prompt and answer.
    n_ctx = shared + width * (_round_up(suffix, PROMPT_STEP) + max_new + 1)
    n_batch = _round_up(max(width * suffix + width, shared, 1), UBATCH_STEP)
    return GroupShape(n_seq=width + (1 if shared else 0), n_ctx=_round_up(n_ctx, 256), n_batch=n_batch,
                      shared=shared)


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


@dataclass
class DecodeStats:
    """Token and time totals of one generation, as the worker measured them."""

    n_generated: int = 0
    n_prompt: int = 0
    shared_prefix: int = 0
    n_groups: int = 0
    decode_calls: int = 0
    seconds: float = 0.0
    #: Steps where every one of ``batch_size`` slots decoded one token and no prompt was read:
    #: their count and time give the full-batch decoding rate the roofline compares.
    full_steps: int = 0
    full_seconds: float = 0.0
    contexts: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the totals as plain data (seconds rounded to milliseconds)."""
        return {"n_generated": self.n_generated, "n_prompt": self.n_prompt, "shared_prefix": self.shared_prefix,
                "n_groups": self.n_groups, "decode_calls": self.decode_calls, "seconds": round(self.seconds, 3),
                "full_steps": self.full_steps, "full_seconds": round(self.full_seconds, 3),
                "contexts": self.contexts}


class GroupDecoder:
    """Greedy decoding of one group at a time in a model's context (``model``: the worker's ``_Model``)."""

    def __init__(self, model: Any, *, max_new: int, batch_size: int, rule: PrefixRule | None,
                 stop_strings: Sequence[bytes], send: Callable[[dict[str, Any]], None]) -> None:
        self.model = model
        self.lib = model.lib
        self.max_new = max_new
        self.batch_size = batch_size
        self.rule = rule
        self.stop_strings = list(stop_strings)
        self.send = send
        self.stats = DecodeStats()

    def run(self, group: Sequence[tuple[str, list[int]]], shape: GroupShape) -> None:
        """Decode every item of ``group`` from an empty cache; report each as it ends."""
        import numpy as np

        lib, model = self.lib, self.model
        if model.ensure_context(shape):
            self.stats.contexts += 1
        ctx, batch, memory = model.ctx, model.batch, lib.llama_get_memory(model.ctx)
        lib.llama_memory_clear(memory, True)
        width, shared = min(self.batch_size, len(group)), shape.shared
        prefix_seq = width
        pending = list(reversed(group))
        free_slots = list(reversed(range(width)))
        active: list[_Sequence] = []
        stats = self.stats
        stats.n_groups += 1
        stats.shared_prefix = max(stats.shared_prefix, shared)
        if shared:
            first = group[0][1]
            for pos in range(shared):
                model.put(batch, pos, first[pos], pos, prefix_seq, pos == shared - 1)
            batch.n_tokens = shared
            self._decode(batch, full=False)
            stats.n_prompt += shared

        def finish(seq: _Sequence, reason: str) -> None:
            text = bytes(seq.text_bytes).decode("utf-8", errors="replace")
            self.send({"event": "result", "id": seq.item_id, "text": text, "n_tokens": len(seq.generated),
                       "n_prompt_tokens": len(seq.prompt_tokens), "finish_reason": reason})
            lib.llama_memory_seq_rm(memory, seq.slot, -1, -1)
            free_slots.append(seq.slot)
            active.remove(seq)

        while pending or active:
            n = 0
            # Running sequences contribute their last sampled token ...
            for seq in active:
                model.put(batch, n, seq.next_token, seq.n_past, seq.slot, True)
                seq.logits_index = n
                seq.n_past += 1
                n += 1
            full = n == self.batch_size
            # ... and free slots take the group's next prompts, while the micro-batch has room.
            while pending and free_slots and n + len(pending[-1][1]) - shared <= shape.n_batch:
                item_id, toks = pending.pop()
                seq = _Sequence(item_id=item_id, prompt_tokens=toks, slot=free_slots.pop())
                if shared:  # the prefix's cells gain this sequence too; nothing is recomputed
                    lib.llama_memory_seq_cp(memory, prefix_seq, seq.slot, -1, -1)
                for pos in range(shared, len(toks)):
                    model.put(batch, n, toks[pos], pos, seq.slot, pos == len(toks) - 1)
                    n += 1
                seq.n_past = len(toks)
                seq.logits_index = n - 1
                stats.n_prompt += len(toks) - shared
                active.append(seq)
                full = False
            batch.n_tokens = n
            self._decode(batch, full=full)
            # finish() removes a sequence from ``active``: iterate over a copy, or the sequence after a
            # finished one would skip this step and be fed its previous token again in the next.
            for seq in active.copy():
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, seq.logits_index),
                                               shape=(model.n_vocab,))
                self._advance(seq, int(np.argmax(logits)), finish)  # greedy: first index of the maximum
        lib.llama_memory_clear(memory, True)

    def _decode(self, batch: Any, *, full: bool) -> None:
        started = time.perf_counter()
        rc = self.lib.llama_decode(self.model.ctx, batch)
        took = time.perf_counter() - started
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} (KV cache full or bad batch)")
        self.stats.decode_calls += 1
        self.stats.seconds += took
        if full:
            self.stats.full_steps += 1
            self.stats.full_seconds += took

    def _advance(self, seq: _Sequence, token: int, finish: Callable[[_Sequence, str], None]) -> None:
        """Append ``token`` to ``seq`` or end it (end of turn, stop string, length, early exit)."""
        lib, model = self.lib, self.model
        if lib.llama_vocab_is_eog(model.vocab, token):
            finish(seq, "stop")
            return
        seq.generated.append(token)
        self.stats.n_generated += 1
        seq.text_bytes += model.piece(token)
        seq.next_token = token
        stops = self.stop_strings
        if stops and any(s in seq.text_bytes for s in stops):
            cut = min(seq.text_bytes.find(s) for s in stops if s in seq.text_bytes)
            del seq.text_bytes[cut:]
            seq.generated.pop()
            finish(seq, "stop")
            return
        if len(seq.generated) >= self.max_new:
            finish(seq, "length")
            return
        rule = self.rule
        if rule is not None and not seq.decided_refusal:
            so_far = bytes(seq.text_bytes).decode("utf-8", errors="ignore")
            if rule.is_decided_refusal(so_far):
                seq.decided_refusal = True  # a refusal is always decoded to the end
            elif not rule.could_become_refusal(so_far):
                finish(seq, "early_exit")
