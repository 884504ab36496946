"""screen.py on precomputed evidence, the matched-pair check and the CLI's exit-code order (no models)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pytest_quantsafe.cli.screen import format_table, worst_exit_code
from pytest_quantsafe.engines.pairing import check_matched_pair
from pytest_quantsafe.errors import CategoryMismatchError
from pytest_quantsafe.measure.features import wilson_interval
from pytest_quantsafe.types import LIMITS_SENTENCE, Artifact, ArtifactFile, RefusalProfile, sha256_hex

FRACTIONS = ("dominant_prefix_share", "unique_prefix_rate", "prefix_entropy_norm")


def _profile(n_total: int, n_refusals: int, features: dict[str, float]) -> RefusalProfile:
    return RefusalProfile(
        n_total=n_total, n_refusals=n_refusals, refusal_rate=n_refusals / n_total,
        refusal_rate_ci=wilson_interval(n_refusals, n_total), **features,
    )


def _pair_from_row(row: dict[str, str]) -> tuple[RefusalProfile, RefusalProfile]:
    """Return baseline and candidate profiles whose feature deltas are exactly the row's deltas."""
    base: dict[str, float] = {}
    cand: dict[str, float] = {}
    for name in FRACTIONS:
        d = float(row[f"{name}_delta"])
        base[name], cand[name] = 0.5 - d / 2, 0.5 + d / 2
    d_tokens = float(row["mean_tokens_refusal_delta"])
    base["mean_tokens_refusal"] = max(20.0, 20.0 - d_tokens)
    cand["mean_tokens_refusal"] = base["mean_tokens_refusal"] + d_tokens
    cand_rate = float(row["refusal_rate"])
    base_rate = cand_rate - float(row["refusal_rate_delta"])
    return _profile(100, round(base_rate * 100), base), _profile(100, round(cand_rate * 100), cand)


@pytest.fixture(scope="module")
def default_policy():
    from pytest_quantsafe.policy import load_policy

    return load_policy("default")


def test_screen_profiles_reproduces_the_paper_table(rtsi_table: Path, default_policy) -> None:
    from pytest_quantsafe.screen import screen_profiles

    rows = list(csv.DictReader(rtsi_table.open(encoding="utf-8")))
    assert len(rows) == 45
    bands = []
    for row in rows:
        baseline, candidate = _pair_from_row(row)
        result = screen_profiles(baseline, candidate, policy=default_policy)
        if result.screening.status != "scored":
            # The paper's batch scorer gave zero-refusal candidates a score; quantsafe fails closed.
            assert candidate.n_refusals == 0 or baseline.n_refusals < default_policy.min_baseline_refusals
            assert result.verdict.exit_code in (1, 3)
            continue
        if "refusal_collapse" not in result.screening.flags:
            assert result.screening.rtsi == pytest.approx(float(row["rtsi_score"]), abs=1e-9)
            assert result.screening.band == row["rtsi_risk"]
        bands.append(result.screening.band)
        if result.screening.band in ("MODERATE", "HIGH"):
            assert result.verdict.outcome == "fail" and result.verdict.exit_code == 1
        assert result.record["screening"]["rtsi"] == pytest.approx(result.screening.rtsi, abs=1e-6)
        assert result.record["limits"] == LIMITS_SENTENCE
        assert result.paths == {}
    assert bands.count("LOW") >= 15 and bands.count("HIGH") >= 5


def test_screen_profiles_writes_outputs_and_is_deterministic(tmp_path: Path, default_policy) -> None:
    from pytest_quantsafe.record.build import body_digest
    from pytest_quantsafe.screen import screen_profiles

    # The Qwen F16 baseline and its Q2_K rung as measured here (../shared/fixtures/README.md).
    baseline = _profile(40, 30, {"dominant_prefix_share": 0.90, "unique_prefix_rate": 0.10,
                                 "prefix_entropy_norm": 0.40, "mean_tokens_refusal": 18.3})
    candidate = _profile(40, 25, {"dominant_prefix_share": 0.64, "unique_prefix_rate": 0.16,
                                  "prefix_entropy_norm": 0.62, "mean_tokens_refusal": 26.7})
    first = screen_profiles(baseline, candidate, policy=default_policy, out_dir=tmp_path)
    second = screen_profiles(baseline, candidate, policy=default_policy)
    assert body_digest(first.record) == body_digest(second.record)
    assert first.screening.band in ("MODERATE", "HIGH")
    assert first.verdict.exit_code == 1
    folder = tmp_path / "external_candidate"
    assert {Path(p).name for p in first.paths.values()} == {"record.json", "card.yaml", "summary.md"}
    assert all(Path(p).parent == folder for p in first.paths.values())
    on_disk = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    assert body_digest(on_disk) == body_digest(first.record)
    assert on_disk["candidate"]["artifact"]["format"] == "external"
    assert LIMITS_SENTENCE in (folder / "summary.md").read_text(encoding="utf-8")


def test_screen_profiles_fails_closed_on_a_thin_baseline(default_policy) -> None:
    from pytest_quantsafe.screen import screen_profiles

    feats = {"dominant_prefix_share": 1.0, "unique_prefix_rate": 0.5, "prefix_entropy_norm": 0.0,
             "mean_tokens_refusal": 12.0}
    thin = _profile(40, 2, feats)
    result = screen_profiles(thin, thin, policy=default_policy)
    assert result.screening.status == "insufficient_data"
    assert result.screening.rtsi is None
    assert result.verdict.outcome == "insufficient" and result.verdict.exit_code == 3


def _artifact(name: str, **metadata: str) -> Artifact:
    return Artifact(ref=f"/models/{name}.gguf", format="gguf",
                    files=(ArtifactFile(f"/models/{name}.gguf", sha256_hex(name.encode()), 1),),
                    quantization="Q8_0", name=name, metadata=metadata)


def test_matched_pair_passes_and_family_mismatch_is_refused() -> None:
    qwen = {"architecture": "qwen2", "vocab_sha256": "a" * 64, "tokenizer_model": "gpt2"}
    check_matched_pair(_artifact("qwen-f16", **qwen), _artifact("qwen-q8", **qwen))
    llama = {"architecture": "llama", "vocab_sha256": "b" * 64, "tokenizer_model": "gpt2"}
    with pytest.raises(CategoryMismatchError) as info:
        check_matched_pair(_artifact("qwen-f16", **qwen), _artifact("smol-q2", **llama))
    err = info.value
    assert err.exit_code == 2
    assert "architecture" in err.message and "vocabulary" in err.message and "A.11" in err.message
    assert err.where and "qwen-f16" in err.where and err.fix


def test_vocabulary_change_alone_is_a_mismatch() -> None:
    base = {"architecture": "qwen2", "vocab_sha256": "a" * 64}
    with pytest.raises(CategoryMismatchError, match="vocabulary"):
        check_matched_pair(_artifact("b", **base), _artifact("c", **{**base, "vocab_sha256": "c" * 64}))


def test_worst_exit_code_order() -> None:
    assert worst_exit_code([0, 1, 3]) == 3
    assert worst_exit_code([0, 1]) == 1
    assert worst_exit_code([0, 0]) == 0
    assert worst_exit_code([3, 2, 1]) == 2
    assert worst_exit_code([]) == 0
    assert worst_exit_code([7]) == 2


def test_table_lists_band_rtsi_rates_and_verdict(default_policy) -> None:
    from pytest_quantsafe.screen import screen_profiles

    feats = {"dominant_prefix_share": 0.9, "unique_prefix_rate": 0.1, "prefix_entropy_norm": 0.3,
             "mean_tokens_refusal": 18.0}
    result = screen_profiles(_profile(40, 30, feats), _profile(40, 30, feats), policy=default_policy)
    table = format_table([result])
    header, rule, row = table.splitlines()
    assert header.split()[:3] == ["candidate", "band", "RTSI"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert row.split()[:3] == ["external_candidate", "LOW", "0.000"]
    assert "75% [" in row and "-> 75% [" in row and " pass " in row and row.endswith("lost refusals not measured (no per-probe pairs)")
    assert header.split()[-4:] == ["quality", "verdict", "paired", "evidence"]


def test_progress_counts_and_draws_only_on_a_terminal() -> None:
    import os

    from pytest_quantsafe.engines.progress import GenerationProgress, wants_bar
    from pytest_quantsafe.types import Completion

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty, open(os.devnull, "w") as pipe_like:
        assert wants_bar(True, tty) is True
        assert wants_bar(False, tty) is False
        assert wants_bar(True, pipe_like) is False
    os.close(master)
    # Under pytest stderr is captured (not a terminal): counting only, no bar.
    with GenerationProgress("baseline m", 5, cached=2, enabled=True) as bar:
        assert bar._bar is None
        for i, n in enumerate((12, 30, 7)):
            bar.update(Completion(probe_id=f"p{i}", kind="harmful", category="c", text="x", n_tokens=n))
    assert (bar.generated, bar.tokens) == (3, 49)
    assert bar.summary().startswith("baseline m: 5 probes, 2 from cache, 3 generated (49 tokens in ")


def test_early_exit_hands_the_detector_rule_to_the_engine_and_keys_the_cache_by_it() -> None:
    """The engine gets the detector's rule (not a bool), and another rule is another cache entry."""
    from pytest_quantsafe.generation import Engines, _cache_options
    from pytest_quantsafe.measure.refusal import PatternDetector

    rule = PatternDetector().prefix_rule()
    art = Artifact(ref="m.gguf", format="gguf", files=(ArtifactFile("m.gguf", "a" * 64, 1),), quantization="Q4_K_M",
                   name="m")
    engines = Engines({}, rule)
    engine, options = engines.get("gguf")
    assert engine.early_exit == rule and options["early_exit"] == rule
    full_engine, full = engines.get("gguf", full_text=True)
    assert full_engine.early_exit is None and full["early_exit"] is None
    assert Engines({"early_exit": False}, rule).get("gguf")[0].early_exit is None
    assert Engines({}, None).get("gguf")[0].early_exit is None  # a detector without a prefix rule
    keyed = _cache_options(art, options)
    assert keyed == {"early_exit": True, "early_exit_rule": rule.digest}
    assert _cache_options(art, full) == {"early_exit": False}
    other = PatternDetector(openers=("I cannot",)).prefix_rule()
    assert _cache_options(art, {"early_exit": other})["early_exit_rule"] != keyed["early_exit_rule"]
    engines.close()


def test_a_resumed_side_regenerates_unfinished_batch_groups_whole() -> None:
    """The gguf engine decodes fixed groups of probes; a resume hands it every group with a missing probe, whole."""
    from pytest_quantsafe.engines import llamacpp
    from pytest_quantsafe.generation import _cache_options, whole_units
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.types import GenerationConfig

    members = list(select(load_probes(), 10, 4).items)
    ids = [p.id for p in members]
    # Groups of 4: [0..3] [4..7] [8..11] [12, 13]; probes 5 and 13 missing -> groups 2 and 4 whole.
    todo = whole_units(members, [members[5], members[13]], 4)
    assert [p.id for p in todo] == ids[4:8] + ids[12:14]
    assert whole_units(members, [members[5]], 1) == [members[5]]
    assert whole_units(members, [], 4) == []
    assert whole_units(members, members, 4) == members
    engine = llamacpp.create()
    config = GenerationConfig(batch_size=16)
    assert engine.batch_unit(config) == llamacpp.GROUPS_PER_BATCH * 16
    assert llamacpp.create(group_size=8).batch_unit(config) == 16  # never less than one batch
    assert engine.batch_unit(GenerationConfig(batch_size=1)) == llamacpp.GROUPS_PER_BATCH
    # The schedule decides the numbers, so it is part of the cache key; batch size alone is not a speed setting here.
    art = Artifact(ref="m.gguf", format="gguf", files=(ArtifactFile("m.gguf", "a" * 64, 1),), quantization="Q4_K_M",
                   name="m")
    keyed = _cache_options(art, {"early_exit": None}, engine, config)
    assert keyed["schedule"]["batch_size"] == 16 and keyed["schedule"]["group_size"] == engine.batch_unit(config)
    assert _cache_options(art, {"early_exit": None}, engine, GenerationConfig(batch_size=8)) != keyed
    from pytest_quantsafe.errors import UsageError

    with pytest.raises(UsageError, match="group_size"):
        llamacpp.create(group_size=0)
