"""Content-addressed cache of completions, so a baseline is generated once and a killed run resumes.

Layout under the root (default ``$QUANTSAFE_CACHE/completions``)::

    <key[:2]>/<key>/meta.json           what the entry is (written atomically, descriptive only)
    <key[:2]>/<key>/completions.jsonl   append-only, one completed probe per line

The key is the SHA-256 of the canonical JSON of everything that decides a completion:
artifact digest, probe-set digest, generation config (without ``batch_size``),
engine id and protocol-relevant options (e.g. ``early_exit``). Each line carries a
SHA-256 of its own content and an HMAC-SHA256 of it keyed by a per-machine key kept
outside the cache folder (``machine_key``): anyone who can write the cache (a restored
CI cache, a shared runner) can recompute a checksum but not the HMAC, so a forged
line cannot steer a screening that is later signed (docs/signing.md). A line that
is torn (the writer was killed), not JSON, missing a field, failing its checksum
or failing its HMAC is dropped on load, reported (a log warning, counted in
``CacheStats``) and its probe generated again: never trusted. Appends are flushed and fsynced line by line under
an exclusive ``flock``, so processes appending to different keys never meet and
processes appending to the same key never interleave bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import cache_dir, write_atomic
from pytest_quantsafe.errors import CacheError
from pytest_quantsafe.types import Completion, GenerationConfig, Probe, canonical_json, sha256_hex

CACHE_SCHEMA = "quantsafe.cache.v1"
COMPLETIONS_FILE = "completions.jsonl"
META_FILE = "meta.json"
#: Fields of a cached completion line besides its checksum and HMAC.
_LINE_FIELDS = ("probe_id", "kind", "category", "text", "n_tokens", "finish_reason")
#: Environment variable naming the cache's HMAC key file (default ``~/.config/quantsafe/cache.key``).
KEY_FILE_ENV = "QUANTSAFE_CACHE_KEY_FILE"

log = logging.getLogger("quantsafe.cache")


def key_file() -> Path:
    """Return where the per-machine cache key lives: ``$QUANTSAFE_CACHE_KEY_FILE``, else under the config folder."""
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "quantsafe" / "cache.key"


def machine_key(path: Path | None = None) -> bytes:
    """Return the cache's HMAC key, creating it (32 random bytes, hex, mode 0600) on first use.

    The key lives outside the cache folder on purpose: whoever restores or shares the
    cache folder does not get it.
    """
    target = path or key_file()
    try:
        text = target.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"cannot read the cache key: {exc}", where=str(target),
                         fix=f"delete it (a new one is made) or point {KEY_FILE_ENV} at a readable file") from None
    if not text:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return machine_key(target)
        except OSError as exc:
            raise CacheError(f"cannot create the cache key: {exc.strerror or exc}", where=str(target),
                             fix=f"make its folder writable or point {KEY_FILE_ENV} elsewhere") from None
        text = secrets.token_hex(32)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text + "\n")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise CacheError("the cache key is not hex", where=str(target),
                         fix="delete it; a new one is made on next use (cached completions are regenerated)") from None
    if len(key) < 16:
        raise CacheError("the cache key is shorter than 16 bytes", where=str(target), fix="delete it")
    return key


def default_root() -> Path:
    """Return the default cache root, ``$QUANTSAFE_CACHE/completions``."""
    return cache_dir() / "completions"


def cache_key_material(
    artifact_digest: str,
    probe_digest: str,
    generation: GenerationConfig,
    engine_id: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the plain data a cache key is the digest of (also stored in ``meta.json``)."""
    settings = generation.to_dict()
    # How many sequences share a batch is a speed setting, not part of what is asked.
    settings.pop("batch_size", None)
    return {
        "schema": CACHE_SCHEMA,
        "artifact_digest": artifact_digest,
        "probe_digest": probe_digest,
        "generation": settings,
        "engine_id": engine_id,
        "options": dict(sorted((options or {}).items())),
    }


def _line_checksum(content: Mapping[str, Any]) -> str:
    return sha256_hex(canonical_json({name: content[name] for name in _LINE_FIELDS}))


def _line_hmac(content: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical_json({name: content[name] for name in _LINE_FIELDS}), hashlib.sha256).hexdigest()


def encode_line(completion: Completion, key: bytes | None = None) -> bytes:
    """Return one cache line (canonical JSON, its checksum and its HMAC under ``key``, newline-terminated)."""
    content: dict[str, Any] = {
        "probe_id": completion.probe_id,
        "kind": completion.kind,
        "category": completion.category,
        "text": completion.text,
        "n_tokens": int(completion.n_tokens),
        "finish_reason": completion.finish_reason,
    }
    content["sha256"] = _line_checksum(content)
    content["hmac"] = _line_hmac(content, key if key is not None else machine_key())
    return canonical_json(content) + b"\n"


def decode_line(raw: bytes, key: bytes | None = None) -> Completion | None:
    """Return the completion a cache line holds, or None when the line is corrupt or unauthenticated."""
    completion, _ = check_line(raw, key if key is not None else machine_key())
    return completion


def check_line(raw: bytes, key: bytes) -> tuple[Completion | None, str]:
    """Return (completion or None, "ok" | "corrupt" | "forged"); "forged" = whole but failing its HMAC."""
    completion = _decode_content(raw)
    if completion is None:
        return None, "corrupt"
    obj = json.loads(raw.decode("utf-8"))
    if not hmac.compare_digest(str(obj["hmac"]), _line_hmac(obj, key)):
        return None, "forged"
    return completion, "ok"


def _decode_content(raw: bytes) -> Completion | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != {*_LINE_FIELDS, "sha256", "hmac"} or not isinstance(obj["hmac"], str):
        return None
    strings = ("probe_id", "kind", "category", "text", "finish_reason")
    if not all(isinstance(obj[name], str) for name in strings):
        return None
    n_tokens = obj["n_tokens"]
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        return None
    if obj["kind"] not in ("harmful", "benign") or obj["sha256"] != _line_checksum(obj):
        return None
    return Completion(probe_id=obj["probe_id"], kind=obj["kind"], category=obj["category"],
                      text=obj["text"], n_tokens=n_tokens, finish_reason=obj["finish_reason"])


@dataclass
class CacheStats:
    """Counters of one cache object: probes found, probes missing, lines dropped (corrupt or failing
    their HMAC), lines written."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    forged: int = 0
    appended: int = 0

    def to_dict(self) -> dict[str, int]:
        """Return the counters as plain data."""
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt, "forged": self.forged,
                "appended": self.appended}


class CompletionCache:
    """Append-only, checksummed, HMAC-authenticated, content-addressed store of completions.

    With ``read=False`` (``screen --no-cache``) nothing is read: every probe is generated
    again, and the fresh completions are still appended.
    """

    def __init__(self, root: Path | None = None, *, key: bytes | None = None, read: bool = True) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.stats = CacheStats()
        self.read = read
        self._key = key
        self._material: dict[str, dict[str, Any]] = {}
        self._meta_written: set[str] = set()

    # ------------------------------------------------------------------ keys

    def key(
        self,
        artifact_digest: str,
        probe_digest: str,
        generation: GenerationConfig,
        engine_id: str,
        options: Mapping[str, Any] | None = None,
    ) -> str:
        """Return the cache key (hex SHA-256) of one model's completions on one probe set."""
        material = cache_key_material(artifact_digest, probe_digest, generation, engine_id, options)
        try:
            key = sha256_hex(canonical_json(material))
        except (TypeError, ValueError) as exc:
            raise CacheError(f"cache key options are not plain JSON data: {exc}", where="options",
                             fix="pass options as strings, numbers, booleans or None") from exc
        self._material[key] = material
        return key

    @property
    def hmac_key(self) -> bytes:
        """Return the HMAC key (the machine key unless one was given)."""
        if self._key is None:
            self._key = machine_key()
        return self._key

    def entry_dir(self, key: str) -> Path:
        """Return the folder of one cache entry."""
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise CacheError(f"not a cache key: {key!r}", fix="use CompletionCache.key(...) to make keys")
        return self.root / key[:2] / key

    def meta(self, key: str) -> dict[str, Any] | None:
        """Return the entry's ``meta.json`` content, or None when absent or unreadable."""
        try:
            data = json.loads((self.entry_dir(key) / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # ------------------------------------------------------------------ reading

    def load(self, key: str) -> dict[str, Completion]:
        """Return the valid cached completions of an entry by probe id (corrupt lines dropped and counted).

        When a probe id appears on several valid lines the first wins, so what a
        run once read is what every later run reads.
        """
        path = self.entry_dir(key) / COMPLETIONS_FILE
        if not self.read:
            return {}
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CacheError(f"cannot read the completion cache: {exc.strerror}", where=str(path),
                             fix="check the permissions, or delete this entry to regenerate it") from exc
        # A killed writer leaves a last piece without its newline: if its checksum holds,
        # only the newline was lost and the content is whole; otherwise it is dropped below.
        found: dict[str, Completion] = {}
        corrupt = forged = 0
        secret = self.hmac_key
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            completion, status = check_line(raw, secret)
            if completion is None:
                corrupt += status == "corrupt"
                forged += status == "forged"
                continue
            found.setdefault(completion.probe_id, completion)
        self.stats.corrupt += corrupt
        self.stats.forged += forged
        if corrupt or forged:
            # Never silent: a torn line is a killed writer, a failing HMAC is someone else's hand.
            log.warning("completion cache %s: dropped %d corrupt line(s) and %d line(s) failing authentication "
                        "(HMAC under %s); their probes are generated again", path, corrupt, forged, key_file())
        return found

    def lookup(self, key: str, probes: Sequence[Probe]) -> tuple[dict[str, Completion], list[Probe]]:
        """Return (cached completions of these probes by id, probes still to generate); counts hits/misses.

        A cached line whose kind or category disagrees with its probe counts as a
        miss: the probe is generated again rather than trusted.
        """
        stored = self.load(key)
        cached: dict[str, Completion] = {}
        missing: list[Probe] = []
        for probe in probes:
            hit = stored.get(probe.id)
            if hit is not None and hit.kind == probe.kind and hit.category == probe.category:
                cached[probe.id] = hit
            else:
                missing.append(probe)
        self.stats.hits += len(cached)
        self.stats.misses += len(missing)
        return cached, missing

    # ------------------------------------------------------------------ writing

    def append(self, key: str, completion: Completion) -> None:
        """Append one completion to an entry, durably (flush + fsync), writing ``meta.json`` first if needed."""
        folder = self.entry_dir(key)
        line = encode_line(completion, self.hmac_key)
        path = folder / COMPLETIONS_FILE
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if key not in self._meta_written:
                self._ensure_meta(key, folder)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A killed writer left half a line: end it, so this line stays whole.
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)  # closing releases the lock
        except OSError as exc:
            raise CacheError(f"cannot write the completion cache: {exc.strerror}", where=str(path),
                             fix="check free space and permissions, or pass another cache directory") from exc
        self.stats.appended += 1

    def _ensure_meta(self, key: str, folder: Path) -> None:
        """Write ``meta.json`` atomically when it is absent or unreadable and the key's inputs are known."""
        material = self._material.get(key)
        if material is None:
            return
        if self.meta(key) is None:
            write_atomic(folder / META_FILE, json.dumps({"key": key, **material}, indent=2, sort_keys=True) + "\n")
        self._meta_written.add(key)
