"""The engine protocol and the registry that picks an engine for an artifact reference.

An engine resolves a reference (a path, ``hf://org/repo@rev``, ``http://host/v1#model``)
into an ``Artifact`` and generates completions for probes. It never decides what a
refusal is and never touches the cache: ``screen.py`` asks it only for the probes the
cache lacks, and it reports each finished completion through ``on_result`` as soon
as it has it, so an interrupted run loses nothing already generated.

Engines are imported lazily: ``import pytest_quantsafe`` must not import torch or
llama_cpp.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pytest_quantsafe.errors import UsageError
from pytest_quantsafe.types import Artifact, Completion, GenerationConfig, Probe

OnResult = Callable[[Completion], None]


class Engine(Protocol):
    """What every engine module provides (through its ``create(**options)`` factory)."""

    #: Short engine name: "gguf", "hf" or "openai".
    name: str

    def engine_id(self) -> str:
        """Return "<engine>/<version>" (e.g. "llama.cpp/0.3.36"); part of the cache key."""
        ...

    def resolve(self, ref: str) -> Artifact:
        """Return the artifact a reference names, with file digests and metadata."""
        ...

    def generate(
        self,
        artifact: Artifact,
        probes: Sequence[Probe],
        config: GenerationConfig,
        on_result: OnResult | None = None,
    ) -> list[Completion]:
        """Return one completion per probe, in the probes' order (greedy, seeded)."""
        ...

    def close(self) -> None:
        """Release the model and any worker process."""
        ...


#: Engine name -> module under pytest_quantsafe.engines exposing ``create(**options)``.
ENGINES: dict[str, str] = {
    "gguf": "pytest_quantsafe.engines.llamacpp",
    "hf": "pytest_quantsafe.engines.hf",
    "openai": "pytest_quantsafe.engines.openai",
}


def detect_engine(ref: str) -> str:
    """Return the engine name for an artifact reference, or raise UsageError."""
    if ref.startswith(("http://", "https://")):
        return "openai"
    if ref.startswith("hf://"):
        return "hf"
    path = Path(ref)
    if path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    if path.is_dir() and any(path.glob("*.gguf")):
        return "gguf"
    raise UsageError(
        f"cannot tell which engine reads {ref!r}",
        where=ref,
        fix="pass a .gguf file, a Hugging Face checkpoint folder (with config.json), "
        "hf://org/repo@revision, or an http(s)://host/v1 endpoint; or set the engine explicitly",
    )


def get_engine(name: str, **options: Any) -> Engine:
    """Return a new engine instance by name ("gguf", "hf", "openai")."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}", fix=f"choose one of {', '.join(sorted(ENGINES))}")
    module = importlib.import_module(ENGINES[name])
    backend: Engine = module.create(**options)
    return backend


def engine_options_from(mapping: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return engine options with ``None`` values dropped (so engine defaults apply)."""
    return {k: v for k, v in (mapping or {}).items() if v is not None}


def preflight(ref: str, engine: str = "auto") -> None:
    """Return None when a local model reference can be read; raise InputError naming it otherwise.

    Cheap checks only (no digest, no load): the path resolves (no symlink loop), a GGUF's
    header and tensor table are whole (``read_gguf``), an HF folder has ``config.json``.
    Front doors call it at configure time so a bad path is a usage error, not a failing test.
    Remote references are checked when the engine resolves them.
    """
    from pytest_quantsafe._util import safe_path
    from pytest_quantsafe.errors import ModelLoadError

    if ref.startswith(("http://", "https://", "hf://")):
        return
    name = detect_engine(ref) if engine == "auto" else engine
    path = safe_path(ref, "model")
    if name == "gguf" and path.is_file():
        from pytest_quantsafe.engines.llamacpp.gguf_metadata import read_gguf

        read_gguf(path)
    elif name == "gguf" and not path.is_dir():
        raise ModelLoadError(f"model {ref} is not a file", where=ref, fix="pass a .gguf model file")
    elif name == "hf" and not (path / "config.json").is_file() and path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{ref} has no config.json", where=ref, fix="pass a transformers checkpoint folder")
