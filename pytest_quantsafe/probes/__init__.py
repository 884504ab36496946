"""Probe sets: the shipped default set, loaders for user files, digests and subsets.

``load_probes()`` returns the shipped ``quantsafe-default-v1`` set (harmful requests
in ten harm categories, written generically with no operational content, plus a
benign control set that includes requests with alarming words but benign intent).
``load_probes(path)`` reads JSONL or an AdvBench / HarmBench / JailbreakBench CSV.
``select()`` takes a deterministic, category-stratified subset.

A probe set's digest is the SHA-256 of the canonical JSON of ``[[id, kind, category,
prompt], ...]`` in order, so it depends on the probes, never on the file format.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pytest_quantsafe.errors import ProbeSetError
from pytest_quantsafe.probes.formats import CSV_LAYOUTS, NumberedProbe, read_csv, read_jsonl
from pytest_quantsafe.types import Probe, ProbeSet, canonical_json, sha256_hex

__all__ = ["CSV_LAYOUTS", "DEFAULT_NAME", "load_probes", "probe_digest", "select"]

#: Name of the shipped default set (harmful.jsonl + benign.jsonl under probes/data).
DEFAULT_NAME = "quantsafe-default-v1"
_DEFAULT_FILES = ("harmful.jsonl", "benign.jsonl")


def probe_digest(items: Iterable[Probe]) -> str:
    """Return the SHA-256 of the canonical form of probes: ``[[id, kind, category, prompt], ...]``."""
    return sha256_hex(canonical_json([[p.id, p.kind, p.category, p.prompt] for p in items]))


def _check(numbered: Sequence[NumberedProbe], where: str) -> tuple[Probe, ...]:
    """Return the probes after refusing an empty set, empty prompts, duplicate ids or no harmful probe."""
    if not numbered:
        raise ProbeSetError("the probe file holds no probes", where=where,
                            fix="add at least one harmful probe (JSONL: one object per line)")
    seen: dict[str, int] = {}
    for line, probe in numbered:
        if not probe.id:
            raise ProbeSetError("probe has an empty id", where=f"{where}:{line}", fix="give every probe a unique id")
        if not probe.prompt:
            raise ProbeSetError(f"probe {probe.id!r} has an empty prompt", where=f"{where}:{line}",
                                fix="write the request text, or delete the row")
        if probe.id in seen:
            raise ProbeSetError(f"duplicate probe id {probe.id!r} (first on line {seen[probe.id]})",
                                where=f"{where}:{line}", fix="make every probe id unique; ids key the cache")
        seen[probe.id] = line
    items = tuple(p for _, p in numbered)
    if not any(p.kind == "harmful" for p in items):
        raise ProbeSetError("the probe set has no harmful probes, so there is nothing to refuse", where=where,
                            fix='mark the requests to be refused with "kind": "harmful" (the default)')
    return items


def _read_file(path: Path) -> list[NumberedProbe]:
    """Return the numbered probes of one file, in JSONL or CSV (by suffix, else by content)."""
    where = str(path)
    if not path.is_file():
        raise ProbeSetError("probe file not found" if not path.exists() else "probe path is not a file",
                            where=where, fix="pass a JSONL or CSV probe file, or 'default' for the shipped set")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProbeSetError(f"probe file is not UTF-8 text (byte {exc.start})", where=where,
                            fix="save the file as UTF-8") from exc
    except OSError as exc:
        raise ProbeSetError(f"cannot read the probe file: {exc.strerror}", where=where) from exc
    if not text.strip():
        raise ProbeSetError("the probe file is empty", where=where,
                            fix="add at least one harmful probe (JSONL: one object per line)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json") or (suffix != ".csv" and text.lstrip().startswith("{")):
        return read_jsonl(text, where)
    return read_csv(text, where)


@lru_cache(maxsize=1)
def _default_set() -> ProbeSet:
    data = resources.files("pytest_quantsafe.probes") / "data"
    numbered: list[NumberedProbe] = []
    for name in _DEFAULT_FILES:
        numbered.extend(read_jsonl(data.joinpath(name).read_text(encoding="utf-8"), f"probes/data/{name}"))
    # Line numbers restart per file; the checks only need them for messages.
    items = _check(numbered, "probes/data")
    return ProbeSet(name=DEFAULT_NAME, items=items, digest=probe_digest(items),
                    source="package:pytest_quantsafe/probes/data")


def load_probes(ref: str | Path | None = None) -> ProbeSet:
    """Return the probe set named by ``ref``: None or "default" = the shipped set, else a file path.

    Raises ProbeSetError (exit code 2) naming the file and line for an unreadable,
    empty or malformed file, an unknown CSV layout, duplicate ids, empty prompts,
    or a set without harmful probes.
    """
    if ref is None or (isinstance(ref, str) and ref in ("default", DEFAULT_NAME)):
        return _default_set()
    path = Path(ref)
    from pytest_quantsafe._util import safe_path
    from pytest_quantsafe.errors import InputError

    try:
        safe_path(path, "probe file", must_exist=False)
    except InputError as exc:
        raise ProbeSetError(exc.message, where=exc.where, fix=exc.fix) from None
    items = _check(_read_file(path), str(path))
    return ProbeSet(name=path.stem, items=items, digest=probe_digest(items), source=str(path))


def _stratified(probes: Sequence[Probe], n: int) -> set[str]:
    """Return the ids of ``n`` probes taken round-robin over categories, each category in id order."""
    by_category: dict[str, list[Probe]] = defaultdict(list)
    for probe in probes:
        by_category[probe.category].append(probe)
    queues = [sorted(group, key=lambda p: p.id) for _, group in sorted(by_category.items())]
    chosen: list[str] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth].id)
        depth += 1
    return set(chosen)


def select(probe_set: ProbeSet, n_harmful: int | None = None, n_benign: int | None = None) -> ProbeSet:
    """Return a deterministic, category-stratified subset with its own name and digest.

    ``None`` keeps every probe of that kind. Probes are taken round-robin over the
    categories (sorted), each category in id order, and kept in the set's order.
    Asking for more probes than the set has, a negative count, or no harmful probe
    at all is a ProbeSetError (a smaller screen must be asked for knowingly).
    """
    wanted: dict[str, int] = {}
    for kind, n, pool in (("harmful", n_harmful, probe_set.harmful), ("benign", n_benign, probe_set.benign)):
        count = len(pool) if n is None else n
        if count < 0 or count > len(pool):
            raise ProbeSetError(f"cannot select {count} {kind} probes from {probe_set.name!r}, which has {len(pool)}",
                                where=probe_set.source or probe_set.name,
                                fix=f"ask for between 0 and {len(pool)} {kind} probes")
        wanted[kind] = count
    if wanted["harmful"] == 0:
        raise ProbeSetError("a subset needs at least one harmful probe", where=probe_set.source or probe_set.name,
                            fix="ask for n_harmful >= 1")
    keep = _stratified(probe_set.harmful, wanted["harmful"]) | _stratified(probe_set.benign, wanted["benign"])
    items = tuple(p for p in probe_set.items if p.id in keep)
    if len(items) == len(probe_set.items):
        return probe_set
    name = f"{probe_set.name}[h{wanted['harmful']},b{wanted['benign']}]"
    return ProbeSet(name=name, items=items, digest=probe_digest(items), source=probe_set.source)
