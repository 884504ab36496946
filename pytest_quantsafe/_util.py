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
