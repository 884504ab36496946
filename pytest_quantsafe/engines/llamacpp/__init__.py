"""The GGUF engine: llama.cpp (llama-cpp-python) in a child process, many probes per decode.

``resolve`` reads a GGUF's metadata with the ``gguf`` package, without loading the
model: digest, quantization (``general.file_type`` and the real per-tensor types),
architecture, vocabulary and chat-template digests. ``generate`` renders each probe
with the model's own chat template and hands the prompts to the child process
``_worker`` (through ``client.WorkerClient``), which decodes up to ``GenerationConfig.batch_size`` sequences
in one llama.cpp context (one KV-cache sequence each, greedy = argmax). A crash in
llama.cpp ends the worker, not the caller, and becomes ``EngineError`` (exit 2).

Options of ``create``: ``threads`` (default: half the CPUs this process may use, at
least 1 — on a busy 2-core machine one thread held ~180 tok/s where two collapsed to
under 5, see ../shared/fixtures/README.md), ``n_gpu_layers`` (default: all layers when
llama.cpp reports GPU offload support, else 0), ``chat_template`` (a Jinja string or a
file path; required for a GGUF without one, and it overrides the file's),
``early_exit`` (a detector's ``PrefixRule``, or its ``to_dict()``: stop a sequence once
no continuation can be a refusal under that rule; default None, off — the engine knows
no refusal words, the caller passes its detector's rule), ``use_extra_bufts`` (default off: the AMX/repack
buffers are where native builds segfault), ``flash_attn`` (default on),
``timeout_s`` (longest silence from the worker before it is declared hung),
``share_prefix`` (default on: the prompt opening every probe of a group shares — system
prompt, role markers — is decoded once and its KV cells shared by each sequence),
``group_size`` (default ``GROUPS_PER_BATCH`` x ``batch_size``: probes are decoded in fixed
consecutive groups of this many, each from an empty KV cache, refilling freed slots within
the group; ``_decode``).

The numbers of a batched sequence depend on its batch neighbours, so the schedule is a pure
function of the probes: ``batch_unit`` tells the generation stage to resume whole groups,
and ``schedule`` names the schedule in the cache key.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import file_sha256, safe_path
from pytest_quantsafe.engines.base import OnResult
from pytest_quantsafe.engines.llamacpp.client import WorkerClient
from pytest_quantsafe.engines.llamacpp.gguf_metadata import GGUFInfo, file_type_label, read_gguf, render_chat
from pytest_quantsafe.errors import EngineError, ModelLoadError, PromptTooLongError, UsageError
from pytest_quantsafe.types import (
    Artifact,
    ArtifactFile,
    Completion,
    GenerationConfig,
    PrefixRule,
    Probe,
    sha256_hex,
)

__all__ = ["GGUFInfo", "LlamaCppEngine", "create", "default_threads", "file_type_label", "read_gguf",
           "render_chat"]

#: End-of-turn markers of common chat templates; those present in a template stop generation
#: even when the model spells them out as plain text instead of one special token.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
#: Names the decoding schedule (fixed groups in probe order, one KV stream, refill within a
#: group; ``_decode``); part of the cache key, so completions of another schedule are not reused.
SCHEDULE = "groups.v1"
#: Default group size in batches: a group of this many times ``batch_size`` probes refills
#: freed slots until its last probes, so the batch stays full for most of its steps.
GROUPS_PER_BATCH = 4


def default_threads() -> int:
    """Return the default thread count: half the CPUs available to this process, at least 1."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available // 2)


def llama_cpp_version() -> str:
    """Return the installed llama-cpp-python version, or raise EngineError when it is absent."""
    try:
        return importlib_metadata.version("llama-cpp-python")
    except importlib_metadata.PackageNotFoundError as exc:
        raise EngineError("llama-cpp-python is not installed, so GGUF models cannot be run",
                          fix="install the engine: pip install 'pytest-quantsafe[gguf]' "
                          "(scripts/setup.sh builds it portable and caches the wheel)") from exc


@functools.lru_cache(maxsize=1)
def llama_cpp_build() -> str:
    """Return 8 hex digits of the SHA-256 of the installed llama.cpp shared libraries.

    Builds of one llama-cpp-python version with other CPU flags (AVX2 or AVX-512, CUDA)
    round differently, so the build, not only the version, identifies what produced a
    completion. Read from the installed files, without importing llama_cpp.
    """
    dist = importlib_metadata.distribution("llama-cpp-python")
    digest = hashlib.sha256()
    seen: set[str] = set()
    for entry in sorted(dist.files or [], key=str):
        name = entry.name
        if entry.parent.name != "lib" or not name.startswith(("libggml", "libllama")):
            continue
        if not (name.endswith((".so", ".dylib", ".dll")) or ".so." in name):
            continue
        data = Path(str(dist.locate_file(entry))).read_bytes()
        content = hashlib.sha256(data).hexdigest()
        if content not in seen:  # versioned copies of one library count once
            seen.add(content)
            digest.update(content.encode())
    return digest.hexdigest()[:8] if seen else "unknown"


# ----------------------------------------------------------------------------- the engine


class LlamaCppEngine:
    """GGUF models through llama.cpp, batched, in a crash-contained worker process."""

    name = "gguf"

    def __init__(self, *, threads: int | None = None, n_gpu_layers: int | None = None,
                 chat_template: str | None = None, early_exit: PrefixRule | Mapping[str, Any] | None = None,
                 use_extra_bufts: bool = False,
                 flash_attn: bool = True, timeout_s: float = 900.0, share_prefix: bool = True,
                 group_size: int | None = None) -> None:
        self.threads = int(threads) if threads else default_threads()
        self.n_gpu_layers = n_gpu_layers
        self.chat_template_option, self.chat_template_where = _load_template_option(chat_template)
        self.early_exit = _prefix_rule_option(early_exit)
        self.use_extra_bufts = bool(use_extra_bufts)
        self.flash_attn = bool(flash_attn)
        self.timeout_s = float(timeout_s)
        self.share_prefix = bool(share_prefix)
        if group_size is not None and int(group_size) < 1:
            raise UsageError(f"engine option group_size must be at least 1, got {group_size}",
                             where="engine option group_size", fix="drop it (default: GROUPS_PER_BATCH x batch_size)")
        self.group_size = int(group_size) if group_size else None
        self._infos: dict[str, GGUFInfo] = {}
        self._digests: dict[tuple[str, int, int], str] = {}
        self._worker: WorkerClient | None = None
        #: Token and time totals of the last ``generate`` call, as the worker measured them.
        self.last_stats: dict[str, Any] = {}

    def engine_id(self) -> str:
        """Return "llama.cpp/<llama-cpp-python version>+<build digest>" (``llama_cpp_build``)."""
        return f"llama.cpp/{llama_cpp_version()}+{llama_cpp_build()}"

    def batch_unit(self, config: GenerationConfig) -> int:
        """Return how many consecutive probes are decoded together (a group, ``_decode``).

        A probe's numbers depend on the other probes of its group and on nothing else, so
        a resumed run must regenerate unfinished groups whole (generation.complete_side).
        """
        batch = max(1, config.batch_size)
        return max(batch, self.group_size or GROUPS_PER_BATCH * batch)

    def schedule(self, config: GenerationConfig) -> dict[str, Any]:
        """Return what, besides the model and the probes, decides the numbers of a completion (cache key)."""
        return {"schedule": SCHEDULE, "batch_size": max(1, config.batch_size), "group_size": self.batch_unit(config),
                "use_extra_bufts": self.use_extra_bufts, "share_prefix": self.share_prefix,
                "flash_attn": self.flash_attn}

    def _info(self, path: Path) -> GGUFInfo:
        key = str(safe_path(path, "model file"))
        if key not in self._infos:
            self._infos[key] = read_gguf(path)
        return self._infos[key]

    def _template(self, info: GGUFInfo, where: str) -> tuple[str, str]:
        if self.chat_template_option is not None:
            return self.chat_template_option, "option"
        if info.chat_template:
            return info.chat_template, "gguf"
        raise ModelLoadError("the GGUF has no chat template (tokenizer.chat_template), so probes cannot be "
                             "put to it as a chat", where=f"{where}: metadata tokenizer.chat_template",
                             fix="pass the model's chat template with the engine option chat_template "
                             "(a Jinja string or a file path; CLI: --chat-template)")

    def resolve(self, ref: str) -> Artifact:
        """Return the artifact for a .gguf path: sha256, quantization, tensor types and metadata digests."""
        path = safe_path(ref, "model file")
        try:
            info = self._info(path)
        except ModelLoadError as exc:
            if str(path) == ref:
                raise
            # Name the path the user gave, not only where its links led.
            raise ModelLoadError(exc.message, where=f"{ref} (resolves to {exc.where})", fix=exc.fix) from None
        template, source = self._template(info, ref)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return Artifact(
            ref=ref,
            format="gguf",
            files=(ArtifactFile(path=str(path), sha256=self._digests[key], size=stat.st_size),),
            quantization=info.file_type,
            name=info.name,
            metadata={
                "architecture": info.architecture,
                "general_name": info.name,
                "file_type": info.file_type,
                "tensor_types": info.tensor_types,
                "vocab_sha256": info.vocab_sha256,
                "tokenizer_model": info.tokenizer_model,
                "chat_template_sha256": sha256_hex(template.encode("utf-8")),
                "chat_template_source": source,
            },
        )

    def prompts(self, artifact: Artifact, probes: Sequence[Probe], config: GenerationConfig) -> list[str]:
        """Return each probe rendered with the model's chat template (system prompt from ``config``)."""
        path = Path(artifact.files[0].path)
        info = self._info(path)
        template, source = self._template(info, str(path))
        out = []
        for probe in probes:
            messages = [{"role": "user", "content": probe.prompt}]
            if config.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": config.system_prompt})
            try:
                out.append(render_chat(template, messages, bos_token=info.bos_token, eos_token=info.eos_token))
            except Exception as exc:  # jinja2 raises many kinds
                # Name the template that failed: the --chat-template file, else the GGUF's metadata.
                where = self.chat_template_where if source == "option" else f"{path}: tokenizer.chat_template"
                raise ModelLoadError(f"the chat template cannot render probe {probe.id!r}: {exc}", where=where,
                                     fix="pass a working template with the engine option chat_template") from exc
        return out

    def _ensure_loaded(self, path: str) -> WorkerClient:
        if self._worker is not None and not self._worker.alive():
            self._worker.close()
            self._worker = None
        if self._worker is None:
            llama_cpp_version()
            self._worker = WorkerClient(self.timeout_s)
        if self._worker.loaded_path != path:
            self._worker.send({"op": "load", "path": path, "n_threads": self.threads,
                               "n_gpu_layers": self.n_gpu_layers, "use_extra_bufts": self.use_extra_bufts,
                               "flash_attn": self.flash_attn})
            try:
                event = self._worker.receive(f"loading {path}")
            except EngineError as exc:
                raise ModelLoadError(f"llama.cpp cannot load {Path(path).name}: {exc.message}", where=path,
                                     fix=exc.fix or "check the file") from exc
            self._worker.loaded_path = path
            self._worker.info = dict(event.get("info", {}))
        return self._worker

    @property
    def worker_pid(self) -> int | None:
        """Return the worker's process id, or None before the first generation."""
        return self._worker.pid if self._worker is not None else None

    def generate(self, artifact: Artifact, probes: Sequence[Probe], config: GenerationConfig,
                 on_result: OnResult | None = None) -> list[Completion]:
        """Return one completion per probe, in order: greedy, batched, each reported when it ends."""
        if not probes:
            return []
        if config.temperature != 0.0:
            raise ModelLoadError(f"the gguf engine decodes greedily only; temperature {config.temperature} "
                                 "was asked", where="generation.temperature", fix="set temperature: 0")
        path = artifact.files[0].path
        prompts = self.prompts(artifact, probes, config)
        info = self._info(Path(path))
        template, _ = self._template(info, path)
        stops = [m for m in END_OF_TURN_MARKERS if m in template or m == info.eos_token]
        early_exit = self.early_exit.to_dict() if self.early_exit is not None else None
        worker = self._ensure_loaded(path)
        self._check_context(worker, probes, prompts, config, path)
        worker.send({"op": "generate", "items": [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)],
                     "max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                     "group_size": self.batch_unit(config),
                     "seed": config.seed, "early_exit": early_exit,
                     "stop_strings": stops, "share_prefix": self.share_prefix})
        results: dict[int, Completion] = {}
        doing = f"generating {len(probes)} completions with {Path(path).name}"
        try:
            while True:
                event = worker.receive(doing)
                if event["event"] == "done":
                    self.last_stats = dict(event.get("stats", {}))
                    break
                if event["event"] != "result":
                    continue
                i = int(event["id"])
                probe = probes[i]
                completion = Completion(probe_id=probe.id, kind=probe.kind, category=probe.category,
                                        text=event["text"], n_tokens=int(event["n_tokens"]),
                                        finish_reason=event["finish_reason"])
                results[i] = completion
                if on_result is not None:
                    on_result(completion)
        except BaseException:
            # The worker's state is unknown mid-stream (or the caller's callback failed): start afresh.
            worker.kill()
            raise
        missing = [probes[i].id for i in range(len(probes)) if i not in results]
        if missing:
            raise EngineError(f"the llama.cpp worker returned no completion for {len(missing)} probes "
                              f"(first: {missing[0]!r})", fix="report this as a bug")
        return [results[i] for i in range(len(probes))]

    def _check_context(self, worker: WorkerClient, probes: Sequence[Probe], prompts: Sequence[str],
                       config: GenerationConfig, path: str) -> None:
        """Raise PromptTooLongError when a prompt plus ``max_new_tokens`` exceeds the model's trained context."""
        worker.send({"op": "count_tokens", "prompts": list(prompts)})
        event = worker.receive(f"counting prompt tokens for {Path(path).name}")
        n_ctx = int(event.get("n_ctx_train") or 0)
        if n_ctx <= 0:
            return
        for probe, count in zip(probes, event.get("counts", [])):
            if int(count) + config.max_new_tokens > n_ctx:
                raise PromptTooLongError(
                    f"probe {probe.id!r} is {count} tokens with the chat template; with max_new_tokens "
                    f"{config.max_new_tokens} it needs {int(count) + config.max_new_tokens}, more than the context "
                    f"of {Path(path).name} ({n_ctx} tokens)", probe_id=probe.id, where=f"probe {probe.id}",
                    fix="shorten the probe's prompt (or lower generation.max_new_tokens in the policy)")

    def close(self) -> None:
        """End the worker process."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def _prefix_rule_option(value: PrefixRule | Mapping[str, Any] | None) -> PrefixRule | None:
    """Return the early-exit rule given as an option (a ``PrefixRule`` or its plain data)."""
    if value is None or value is False or isinstance(value, PrefixRule):
        return value or None
    if isinstance(value, Mapping):
        try:
            return PrefixRule.from_dict(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"engine option early_exit is not a refusal prefix rule: {exc}",
                             where="engine option early_exit",
                             fix="pass a detector's prefix_rule() (screen.py does when early exit is on)") from exc
    raise UsageError(f"engine option early_exit must be a refusal prefix rule, not {value!r}",
                     where="engine option early_exit",
                     fix="pass a detector's prefix_rule(), e.g. PatternDetector().prefix_rule(), or None")


def _load_template_option(value: str | None) -> tuple[str | None, str]:
    """Return (the chat template given as an option, where it came from): a file's text when it names a file.

    The template is compiled here, so a broken file is reported as that file (with its
    line) before any model is read, not later as the GGUF's metadata.
    """
    if value is None:
        return None, ""
    where = "engine option chat_template"
    text = value
    if "{" not in value and len(value) < 4096:
        path = Path(value).expanduser()
        where = str(path)
        if not path.is_file():
            raise ModelLoadError(f"chat template file {value} does not exist", where=value,
                                 fix="pass a Jinja template string or the path of a file holding one")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ModelLoadError(f"chat template file is not UTF-8 text (byte {exc.start})", where=where,
                                 fix="save the Jinja chat template as UTF-8 text") from None
        except OSError as exc:
            raise ModelLoadError(f"cannot read the chat template file: {exc.strerror or exc}", where=where,
                                 fix="pass a readable Jinja template file") from None
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"the chat template is not valid Jinja: {exc.message}", where=f"{where} (line {exc.lineno})",
                             fix="fix the template syntax (a Hugging Face chat template is Jinja)") from None
    return text, where


#: The options of ``create`` and their types (engines/options.py types ``KEY=VALUE`` strings by it).
OPTIONS: dict[str, type] = {"threads": int, "n_gpu_layers": int, "chat_template": str, "early_exit": bool,
                            "use_extra_bufts": bool, "flash_attn": bool, "timeout_s": float, "share_prefix": bool,
                            "group_size": int}


def create(**options: Any) -> LlamaCppEngine:
    """Return a new llama.cpp engine (options: see the module docstring); an unknown option is a UsageError."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise UsageError(f"the gguf engine has no option {', '.join(unknown)}", where="engine options",
                         fix=f"use {', '.join(sorted(OPTIONS))}")
    return LlamaCppEngine(**options)
