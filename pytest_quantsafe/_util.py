"""Small helpers shared by several stages: the machine cache root and file digests.

Private to the package; nothing here knows about models, probes or records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
