"""The completion cache: keys, round trip, resume after a killed writer, corrupt and torn lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_quantsafe.engines.cache import COMPLETIONS_FILE, CompletionCache, default_root, encode_line
from pytest_quantsafe.errors import CacheError
from pytest_quantsafe.probes import load_probes, select
from pytest_quantsafe.types import Completion, GenerationConfig, Probe

ARTIFACT = "a" * 64
ENGINE = "llama.cpp/0.3.36"
REPO = Path(__file__).resolve().parent.parent


def _completion(probe: Probe, n: int = 0) -> Completion:
    # Texts with what real models emit: quotes, newlines, non-ASCII, an emoji.
    text = f"I'm sorry, but I can't help with \"{probe.id}\".\nCafé — attempt {n} ✓ 🙂"
    return Completion(probe_id=probe.id, kind=probe.kind, category=probe.category, text=text,
                      n_tokens=12 + n, finish_reason="stop" if n % 2 == 0 else "length")


@pytest.fixture(scope="module")
def probes() -> tuple[Probe, ...]:
    return select(load_probes(), n_harmful=10, n_benign=4).items


@pytest.fixture()
def cache(tmp_path: Path) -> CompletionCache:
    return CompletionCache(tmp_path / "completions")


def _key(cache: CompletionCache, **changes: object) -> str:
    subset = select(load_probes(), n_harmful=10, n_benign=4)
    args = {"artifact_digest": ARTIFACT, "probe_digest": subset.digest, "generation": GenerationConfig(),
            "engine_id": ENGINE, "options": {"early_exit": True}}
    args.update(changes)
    return cache.key(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keys


def test_key_depends_on_what_decides_a_completion(cache: CompletionCache) -> None:
    base = _key(cache)
    assert len(base) == 64 and base == _key(cache)
    # Batch size changes speed, not what is asked.
    assert _key(cache, generation=GenerationConfig(batch_size=1)) == base
    different = {
        "max_new_tokens": _key(cache, generation=GenerationConfig(max_new_tokens=64)),
        "seed": _key(cache, generation=GenerationConfig(seed=1)),
        "temperature": _key(cache, generation=GenerationConfig(temperature=0.7)),
        "system_prompt": _key(cache, generation=GenerationConfig(system_prompt="Be brief.")),
        "artifact": _key(cache, artifact_digest="b" * 64),
        "probes": _key(cache, probe_digest=load_probes().digest),
        "engine": _key(cache, engine_id="llama.cpp/0.3.37"),
        "early_exit": _key(cache, options={"early_exit": False}),
        "no options": _key(cache, options=None),
    }
    assert base not in different.values()
    assert len(set(different.values())) == len(different)


def test_key_refuses_options_that_are_not_json(cache: CompletionCache) -> None:
    with pytest.raises(CacheError) as info:
        _key(cache, options={"threshold": float("nan")})
    assert info.value.where == "options"


def test_default_root_follows_quantsafe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTSAFE_CACHE", str(tmp_path / "qs"))
    assert default_root() == tmp_path / "qs" / "completions"
    assert CompletionCache().root == tmp_path / "qs" / "completions"


# --------------------------------------------------------------------------- round trip


def test_round_trip_and_meta(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    written = [_completion(p, i) for i, p in enumerate(probes)]
    for completion in written:
        cache.append(key, completion)
    assert cache.stats.appended == len(probes)
    fresh = CompletionCache(cache.root)
    assert fresh.load(key) == {c.probe_id: c for c in written}
    meta = fresh.meta(key)
    assert meta is not None
    assert meta["key"] == key and meta["artifact_digest"] == ARTIFACT and meta["engine_id"] == ENGINE
    assert meta["generation"] == {"max_new_tokens": 96, "temperature": 0.0, "seed": 0, "system_prompt": None}
    assert meta["options"] == {"early_exit": True}
    entry = cache.entry_dir(key)
    assert entry == cache.root / key[:2] / key
    assert sorted(p.name for p in entry.iterdir()) == ["completions.jsonl", "meta.json"]
    lines = (entry / COMPLETIONS_FILE).read_bytes().splitlines()
    assert len(lines) == len(probes)
    assert set(json.loads(lines[0])) == {"probe_id", "kind", "category", "text", "n_tokens", "finish_reason",
                                         "sha256", "hmac"}


def test_lookup_counts_hits_and_misses(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    for probe in probes[:6]:
        cache.append(key, _completion(probe))
    reader = CompletionCache(cache.root)
    cached, missing = reader.lookup(key, probes)
    assert sorted(cached) == sorted(p.id for p in probes[:6])
    assert missing == list(probes[6:])
    assert (reader.stats.hits, reader.stats.misses, reader.stats.corrupt) == (6, len(probes) - 6, 0)
    other = _key(reader, generation=GenerationConfig(max_new_tokens=32))
    assert reader.lookup(other, probes) == ({}, list(probes))


def test_entry_for_another_probe_kind_is_not_trusted(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    probe = probes[0]
    cache.append(key, Completion(probe_id=probe.id, kind="benign", category=probe.category, text="Sure.",
                                 n_tokens=2))
    cached, missing = cache.lookup(key, [probe])
    assert cached == {} and missing == [probe]


# --------------------------------------------------------------------------- corruption


def test_corrupt_lines_are_dropped_and_regenerated(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    for probe in probes[:5]:
        cache.append(key, _completion(probe))
    path = cache.entry_dir(key) / COMPLETIONS_FILE
    lines = path.read_bytes().split(b"\n")
    # Line 2: content changed but checksum kept; line 4: not JSON any more.
    lines[1] = lines[1].replace(b"I'm sorry", b"Sure, here")
    lines[3] = lines[3][: len(lines[3]) // 2] + b"#" + lines[3][len(lines[3]) // 2:]
    path.write_bytes(b"\n".join(lines))
    reader = CompletionCache(cache.root)
    cached, missing = reader.lookup(key, probes[:5])
    assert sorted(cached) == sorted(p.id for p in (probes[0], probes[2], probes[4]))
    assert missing == [probes[1], probes[3]]
    assert reader.stats.corrupt == 2
    for probe in missing:
        reader.append(key, _completion(probe, 1))
    again = CompletionCache(cache.root)
    cached, missing = again.lookup(key, probes[:5])
    assert missing == [] and cached[probes[1].id] == _completion(probes[1], 1)
    assert again.stats.corrupt == 2  # the bad lines stay in the append-only file and stay dropped


def test_truncated_last_line_is_dropped_and_the_next_append_stays_whole(
        cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    for probe in probes[:3]:
        cache.append(key, _completion(probe))
    path = cache.entry_dir(key) / COMPLETIONS_FILE
    size = path.stat().st_size
    last = len(encode_line(_completion(probes[2])))
    os.truncate(path, size - last // 2)  # what a writer killed mid-line leaves
    reader = CompletionCache(cache.root)
    cached, missing = reader.lookup(key, probes[:4])
    assert sorted(cached) == sorted(p.id for p in probes[:2]) and missing == list(probes[2:4])
    assert reader.stats.corrupt == 1
    for probe in missing:
        reader.append(key, _completion(probe, 3))
    final = CompletionCache(cache.root)
    loaded = final.load(key)
    assert loaded[probes[2].id] == _completion(probes[2], 3) and loaded[probes[3].id] == _completion(probes[3], 3)
    assert len(loaded) == 4 and final.stats.corrupt == 1


def test_last_line_without_only_its_newline_is_kept(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    for probe in probes[:2]:
        cache.append(key, _completion(probe))
    path = cache.entry_dir(key) / COMPLETIONS_FILE
    os.truncate(path, path.stat().st_size - 1)
    reader = CompletionCache(cache.root)
    assert len(reader.load(key)) == 2 and reader.stats.corrupt == 0
    reader.append(key, _completion(probes[2]))
    assert len(CompletionCache(cache.root).load(key)) == 3


def test_unreadable_meta_is_rewritten(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    cache.append(key, _completion(probes[0]))
    meta = cache.entry_dir(key) / "meta.json"
    meta.write_text('{"key": "trunc')
    writer = CompletionCache(cache.root)
    assert writer.meta(_key(writer)) is None
    writer.append(key, _completion(probes[1]))
    assert json.loads(meta.read_text())["key"] == key
    assert not [p for p in meta.parent.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_root_is_a_cache_error(tmp_path: Path, probes: tuple[Probe, ...]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = CompletionCache(blocker)
    key = _key(cache)
    with pytest.raises(CacheError) as info:
        cache.append(key, _completion(probes[0]))
    assert str(blocker) in (info.value.where or "") and info.value.fix
    with pytest.raises(CacheError):
        cache.entry_dir("../../etc")


# --------------------------------------------------------------------------- processes

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pytest_quantsafe.engines.cache import CompletionCache
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.types import Completion, GenerationConfig

    root, artifact, delay = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    subset = select(load_probes(), n_harmful=10, n_benign=4)
    cache = CompletionCache(root)
    key = cache.key(artifact, subset.digest, GenerationConfig(), "llama.cpp/0.3.36", {"early_exit": True})
    for i, probe in enumerate(subset.items):
        text = f"I'm sorry, but I can't help with \\"{probe.id}\\".\\nCafé — attempt 0 ✓ 🙂"
        cache.append(key, Completion(probe.id, probe.kind, probe.category, text, 12, "stop"))
        print(probe.id, flush=True)
        time.sleep(delay)
""")


def _writer(tmp_path: Path, artifact: str, delay: float) -> subprocess.Popen[str]:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "completions"), artifact, str(delay)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_killed_writer_resumes_without_recomputing(tmp_path: Path, cache: CompletionCache,
                                                   probes: tuple[Probe, ...]) -> None:
    # The writer sleeps after each durable append, so the kill lands between lines.
    proc = _writer(tmp_path, ARTIFACT, delay=1.0)
    assert proc.stdout is not None
    done = [proc.stdout.readline().strip() for _ in range(4)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done += [line.strip() for line in proc.stdout.read().splitlines()]
    assert 4 <= len(done) < len(probes)

    key = _key(cache)
    cached, missing = cache.lookup(key, probes)
    # Every completion the writer reported is there; at most one more, written just before the kill.
    order = [p.id for p in probes]
    assert set(done) <= set(cached) and sorted(cached, key=order.index) == order[: len(cached)]
    assert len(cached) <= len(done) + 1
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (len(cached), len(probes) - len(cached), 0)
    assert [p.id for p in missing] == order[len(cached):]
    for probe in missing:
        cache.append(key, _completion(probe))
    # Second resume: everything is a hit, and no probe was ever written twice.
    rerun = CompletionCache(cache.root)
    cached, missing = rerun.lookup(key, probes)
    assert missing == [] and (rerun.stats.hits, rerun.stats.misses) == (len(probes), 0)
    ids = [json.loads(line)["probe_id"] for line in (cache.entry_dir(key) / COMPLETIONS_FILE).read_text().splitlines()]
    assert sorted(ids) == sorted(p.id for p in probes)
    assert all(cached[p].text == _completion(probes[order.index(p)]).text for p in done)


def test_two_processes_append_to_different_keys(tmp_path: Path, probes: tuple[Probe, ...]) -> None:
    writers = [_writer(tmp_path, digest, delay=0.0) for digest in ("c" * 64, "d" * 64)]
    outputs = [w.communicate(timeout=60)[0].split() for w in writers]
    assert [w.returncode for w in writers] == [0, 0]
    cache = CompletionCache(tmp_path / "completions")
    for digest, printed in zip(("c" * 64, "d" * 64), outputs):
        loaded = cache.load(_key(cache, artifact_digest=digest))
        assert sorted(loaded) == sorted(printed) == sorted(p.id for p in probes)
    assert cache.stats.corrupt == 0


def test_two_processes_on_one_key_never_tear_lines(tmp_path: Path, probes: tuple[Probe, ...]) -> None:
    writers = [_writer(tmp_path, ARTIFACT, delay=0.0) for _ in range(2)]
    for w in writers:
        w.communicate(timeout=60)
    cache = CompletionCache(tmp_path / "completions")
    key = _key(cache)
    lines = (cache.entry_dir(key) / COMPLETIONS_FILE).read_bytes().splitlines()
    assert len(lines) == 2 * len(probes)
    assert len(cache.load(key)) == len(probes) and cache.stats.corrupt == 0



# --------------------------------------------------------------------------- a real model


@pytest.mark.slow
def test_real_completions_round_trip_and_a_rerun_generates_nothing(tmp_path: Path, smollm2_gguf: Path) -> None:
    """Completions of a real GGUF model, cached as the engine reports them, come back byte-identical."""
    from pytest_quantsafe.engines.base import get_engine

    subset = select(load_probes(), n_harmful=4, n_benign=2)
    config = GenerationConfig(max_new_tokens=24, batch_size=6)
    backend = get_engine("gguf", threads=1)
    try:
        artifact = backend.resolve(str(smollm2_gguf))
        cache = CompletionCache(tmp_path / "completions")
        key = cache.key(artifact.digest, subset.digest, config, backend.engine_id(), {"early_exit": False})
        assert cache.lookup(key, subset.items) == ({}, list(subset.items))
        generated = backend.generate(artifact, subset.items, config, on_result=lambda c: cache.append(key, c))
    finally:
        backend.close()
    assert len(generated) == 6 and all(c.text.strip() and c.n_tokens > 0 for c in generated)
    assert cache.stats.appended == 6
    rerun = CompletionCache(tmp_path / "completions")
    cached, missing = rerun.lookup(key, subset.items)
    assert missing == [] and (rerun.stats.hits, rerun.stats.misses, rerun.stats.corrupt) == (6, 0, 0)
    assert [cached[p.id] for p in subset.items] == generated
    meta = rerun.meta(key)
    assert meta is not None and meta["artifact_digest"] == artifact.digest == smollm2_digest()


def smollm2_digest() -> str:
    from pytest_quantsafe import zoo

    return zoo.MODELS["smollm2-135m-q4_1"].sha256


# --------------------------------------------------------------------------- authentication


def test_key_file_is_made_once_with_mode_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from pytest_quantsafe.engines.cache import KEY_FILE_ENV, machine_key

    path = tmp_path / "cfg" / "cache.key"
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    first = machine_key()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 32
    assert machine_key() == first  # reused, not remade
    assert not path.is_relative_to(tmp_path / "completions")


def test_forged_line_with_a_valid_checksum_is_detected_reported_and_regenerated(
        cache: CompletionCache, probes: tuple[Probe, ...], caplog: pytest.LogCaptureFixture) -> None:
    """The attack: rewrite a cached answer and recompute its sha256 (as anyone can); the HMAC fails."""
    from pytest_quantsafe.engines.cache import _line_checksum

    key = _key(cache)
    for probe in probes:
        cache.append(key, _completion(probe))
    path = cache.entry_dir(key) / COMPLETIONS_FILE
    lines = path.read_bytes().splitlines()
    forged = json.loads(lines[0])
    forged["text"] = "I'm sorry, but I can't help with that."  # a compliance turned into a refusal
    forged["sha256"] = _line_checksum(forged)
    lines[0] = json.dumps(forged).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = CompletionCache(cache.root)
    with caplog.at_level("WARNING", logger="quantsafe.cache"):
        cached, missing = reader.lookup(key, probes)
    assert [p.id for p in missing] == [probes[0].id]  # regenerated, not trusted
    assert probes[0].id not in cached and reader.stats.forged == 1 and reader.stats.corrupt == 0
    assert "failing authentication" in caplog.text and str(path) in caplog.text


def test_line_written_under_another_machine_key_is_not_trusted(tmp_path: Path, probes: tuple[Probe, ...]) -> None:
    writer = CompletionCache(tmp_path / "c", key=b"k" * 32)
    key = _key(writer)
    writer.append(key, _completion(probes[0]))
    reader = CompletionCache(tmp_path / "c", key=b"m" * 32)
    assert reader.load(key) == {} and reader.stats.forged == 1


def test_corrupt_lines_are_reported(cache: CompletionCache, probes: tuple[Probe, ...],
                                    caplog: pytest.LogCaptureFixture) -> None:
    key = _key(cache)
    cache.append(key, _completion(probes[0]))
    with open(cache.entry_dir(key) / COMPLETIONS_FILE, "ab") as fh:
        fh.write(b"{not json\n")
    reader = CompletionCache(cache.root)
    with caplog.at_level("WARNING", logger="quantsafe.cache"):
        assert len(reader.load(key)) == 1
    assert reader.stats.corrupt == 1 and "1 corrupt line(s)" in caplog.text


def test_no_cache_reads_nothing_but_still_writes(cache: CompletionCache, probes: tuple[Probe, ...]) -> None:
    key = _key(cache)
    for probe in probes:
        cache.append(key, _completion(probe))
    fresh = CompletionCache(cache.root, read=False)
    cached, missing = fresh.lookup(key, probes)
    assert cached == {} and len(missing) == len(probes)


@pytest.mark.slow
def test_record_states_its_cache_provenance(tmp_path: Path, smollm2_gguf: Path) -> None:
    """Real SmolLM2 generations: a cold run generates all, a warm one reads all, --no-cache reads none, and a
    second candidate in the same run reads the baseline the first one generated."""
    from pytest_quantsafe import zoo
    from pytest_quantsafe.policy import load_policy
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.screen import screen_models

    probes = select(load_probes(), 2, 1)
    baseline = str(zoo.build_variant("smollm2", "F16"))
    runs = [screen_models(baseline, [str(smollm2_gguf)], policy=load_policy("default"), probes=probes,
                          cache_dir=tmp_path / "c", progress=False, use_cache=use)[0].record["cache"]
            for use in (True, True, False)]
    assert (runs[0]["generated"], runs[0]["baseline_from_cache"], runs[0]["candidate_from_cache"]) == (6, 0, 0)
    assert (runs[1]["generated"], runs[1]["baseline_from_cache"], runs[1]["candidate_from_cache"]) == (0, 3, 3)
    assert runs[2]["read"] is False and runs[2]["generated"] == 6
    # Two candidates in one run: the baseline is generated once (3 + 3 + 3 completions written, not 12),
    # and a second run of both generates nothing.
    candidates = [str(smollm2_gguf), str(zoo.build_variant("smollm2", "Q2_K"))]

    def written() -> int:
        return sum(len(p.read_bytes().splitlines()) for p in (tmp_path / "two").rglob(COMPLETIONS_FILE))

    for generated in (6, 0):
        pair = screen_models(baseline, candidates, policy=load_policy("default"), probes=probes,
                             cache_dir=tmp_path / "two", progress=False)
        assert written() == 9
        assert [result.record["cache"]["generated"] for result in pair] == [generated, generated]
