"""Small helpers shared by several stages: the cache root, file digests, atomic writes, safe
names, plain-text tables and which files of a model folder are the artifact.

Private to the package; nothing here knows about probes, scores or records.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

#: Characters not allowed in a folder or test id derived from a model reference.
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")

#: Suffixes of the files of a model folder that carry weights. With ``config.json`` they are
#: the artifact: what the HF engine digests into the record and what attest/verify sign.
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack",
                   ".npz")
#: The model folder's configuration file, part of the artifact (it decides architecture and quantization).
MODEL_CONFIG = "config.json"


def cache_dir() -> Path:
    """Return the root of quantsafe's machine-wide cache (``$QUANTSAFE_CACHE``, default ``~/.cache/quantsafe``)."""
    return Path(os.environ.get("QUANTSAFE_CACHE") or Path.home() / ".cache" / "quantsafe")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_name(text: str) -> str:
    """Return ``text`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``."""
    return UNSAFE_NAME_CHARS.sub("_", text)


def model_folder_files(folder: Path) -> tuple[list[Path], Path | None]:
    """Return (the weight files directly in ``folder``, sorted; its ``config.json`` or None).

    One definition for the engine that digests a checkpoint folder and for the signer
    that names its subjects, so a record and its attestation agree on the files.
    """
    weights = sorted(p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    config = folder / MODEL_CONFIG
    return weights, config if config.is_file() else None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; when the block succeeds it is synced and renamed
    onto ``target`` (mode 644), so readers see the old file or the whole new one; else it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        sync = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(sync)
        finally:
            os.close(sync)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def text_table(rows: Sequence[Sequence[str]], *, rule_under_header: bool = False) -> list[str]:
    """Return ``rows`` as left-aligned columns two spaces apart (trailing spaces stripped), with a
    dashed line under the first row when ``rule_under_header``."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if rule_under_header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
