"""Small helpers shared by several stages: the cache root, file digests, atomic writes, safe
names, plain-text tables and which files of a model folder are the artifact.

Private to the package; nothing here knows about probes, scores or records.
"""

from __future__ import annotations

import contextlib
import fcntl
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
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on building ``target`` (a file or folder in the cache).

    Two processes sharing one cache (two CI jobs on a runner, parallel test workers) then
    build a fixture once: the second waits here, and the caller re-checks ``target`` before
    building. The lock is an ``flock`` on ``.<name>.lock`` beside the target, released when
    the block ends or the process dies. Not re-entrant: lock each target once per process.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


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


# --------------------------------------------------------------------------- bad-input guards
# Kept in one block: every front door resolves user paths through ``safe_path`` and checks
# output paths with ``check_writable`` before any generation starts (docs/architecture.md).


def safe_path(ref: str | os.PathLike[str], what: str, *, must_exist: bool = True) -> Path:
    """Return the absolute, symlink-free path ``ref`` names; raise InputError (exit 2) when it cannot be resolved.

    A symlink loop, a dangling link or a path component that is a file all raise
    ``InputError`` naming ``what`` and the path, never ``RuntimeError``/``OSError``.
    """
    from pytest_quantsafe.errors import InputError

    raw = str(ref)
    path = Path(raw).expanduser()
    try:
        resolved = path.resolve(strict=must_exist)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        resolved = None
        reason = "is a symlink loop"
    except FileNotFoundError:
        resolved = None
        reason = "is a dangling symlink" if path.is_symlink() else "does not exist"
    except OSError as exc:
        resolved = None
        reason = "is a symlink loop" if exc.errno == 40 else f"cannot be resolved ({exc.strerror or exc})"
    if resolved is None:
        raise InputError(f"{what} {raw} {reason}", where=raw,
                         fix=f"pass the path of an existing {what} (check the link with `ls -l`)")
    return resolved


def check_writable(path: str | os.PathLike[str], what: str, *, folder: bool) -> Path:
    """Return ``path`` when an output folder (``folder``) or file can be written there; raise InputError otherwise.

    Creates nothing: it checks that the path (or its nearest existing parent) is of the
    right kind and writable, so a bad ``--out`` fails in seconds, before generation.
    """
    from pytest_quantsafe.errors import InputError

    target = Path(path).expanduser()
    fix = f"choose a writable {what} path"
    if target.exists() or target.is_symlink():
        try:
            target.resolve(strict=True)
        except (OSError, RuntimeError):
            raise InputError(f"{what} {target} is a broken or looping symlink", where=str(target), fix=fix) from None
        if folder and not target.is_dir():
            raise InputError(f"{what} {target} is a file, not a folder", where=str(target),
                             fix="pass a folder (it is created when missing), not an existing file")
        if not folder and target.is_dir():
            raise InputError(f"{what} {target} is a folder, not a file", where=str(target), fix=fix)
        probe = target if folder else target.parent
    else:
        probe = target.parent
        while not probe.exists():
            if probe.is_symlink():
                raise InputError(f"{what} {target}: {probe} is a broken symlink", where=str(target), fix=fix)
            probe = probe.parent
        if not probe.is_dir():
            raise InputError(f"{what} {target}: {probe} is a file, not a folder", where=str(target), fix=fix)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what} {target}: {probe} is not writable", where=str(target), fix=fix)
    return target
