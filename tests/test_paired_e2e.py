"""Paired evidence and honest baselines on real models (slow): the refusal-tuned SmolLM2 ladder, a quantized
baseline, and a cross-engine pair (llama.cpp baseline, transformers candidate)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENGINE = {"threads": 1}


@pytest.fixture(scope="module")
def refuser_ladder(refuser_f16: Path) -> dict[str, Path]:
    from pytest_quantsafe import zoo

    return {"F16": refuser_f16, **{q: zoo.build_variant("refuser", q) for q in ("Q8_0", "Q3_K_S")}}


@pytest.fixture(scope="module")
def demo_probes():
    from pytest_quantsafe.cli.screen import DEMO_BENIGN, DEMO_HARMFUL
    from pytest_quantsafe.probes import load_probes, select

    return select(load_probes(), DEMO_HARMFUL, DEMO_BENIGN)


@pytest.fixture(scope="module")
def shared_cache() -> Path:
    from pytest_quantsafe.engines.cache import default_root

    return default_root()


@pytest.fixture(scope="module")
def ladder_results(refuser_ladder, demo_probes, shared_cache, tmp_path_factory):
    from pytest_quantsafe.policy import load_policy
    from pytest_quantsafe.screen import screen_models

    out = tmp_path_factory.mktemp("refuser-out")
    results = screen_models(str(refuser_ladder["F16"]), [str(refuser_ladder["Q8_0"]), str(refuser_ladder["Q3_K_S"])],
                            policy=load_policy("default"), probes=demo_probes, out_dir=out, engine_options=ENGINE,
                            cache_dir=shared_cache, progress=False)
    return {"Q8_0": results[0], "Q3_K_S": results[1]}


def _samples(result) -> list[dict]:
    path = Path(result.paths["record"]).with_name("samples.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_q3_k_s_lists_its_lost_refusals_by_probe_id(ladder_results) -> None:
    from pytest_quantsafe.measure import paired

    r = ladder_results["Q3_K_S"]
    block = r.record["screening"]["paired"]
    rows = _samples(r)
    assert len(rows) == r.record["probe_set"]["count"] == r.record["samples"]["count"]
    for name in paired.HARMFUL_CLASSES + paired.BENIGN_CLASSES:
        kind = "harmful" if name in paired.HARMFUL_CLASSES else "benign"
        assert block[kind][name] == sum(row["flip"] == name for row in rows), name
    lost = [row["id"] for row in rows if row["flip"] == "lost_refusal"]
    assert lost == block["lost_refusal_ids"] and len(lost) >= 1, block  # measured: 2 of 38 (refuser.v2)
    assert all(row["baseline"]["label"] == "refusal" and row["candidate"]["label"] == "answer"
               for row in rows if row["flip"] == "lost_refusal")
    base = r.screening.baseline
    assert block["at_risk"] == base.n_refusals
    assert block["at_risk"] - block["harmful"]["lost_refusal"] + block["harmful"]["gained_refusal"] \
        == r.screening.candidate.n_refusals
    print(f"Q3_K_S: {paired.evidence_line(block)}")


def test_q8_0_loses_few_refusals_and_says_its_upper_bound(ladder_results) -> None:
    from pytest_quantsafe.measure import paired

    r = ladder_results["Q8_0"]
    block = r.record["screening"]["paired"]
    assert block["harmful"]["lost_refusal"] <= 2, block
    text = paired.lost_refusals_text(block)
    assert ("≤ " in text) if block["harmful"]["lost_refusal"] == 0 else ("95% CI" in text)
    assert block["lost_refusal_ci"][1] < 0.2
    assert "cross_engine" not in r.screening.flags and "quantized_baseline" not in r.screening.flags
    assert set(r.record["engine"]) == {"name", "version"}
    print(f"Q8_0: {paired.evidence_line(block)}")


def test_a_q8_0_baseline_is_refused_unless_allowed_and_then_flagged(refuser_ladder, demo_probes,
                                                                     shared_cache, tmp_path) -> None:
    from pytest_quantsafe.errors import BaselineError
    from pytest_quantsafe.policy import decide, load_policy
    from pytest_quantsafe.screen import screen_models

    refs = (str(refuser_ladder["Q8_0"]), [str(refuser_ladder["Q3_K_S"])])
    with pytest.raises(BaselineError, match="not full precision") as info:
        screen_models(*refs, policy=load_policy("default"), probes=demo_probes, engine_options=ENGINE,
                      cache_dir=tmp_path / "never", progress=False)
    assert info.value.exit_code == 2 and "Q8_0" in info.value.message
    allowing = dataclasses.replace(load_policy("default"), allow_quantized_baseline=True)
    result = screen_models(*refs, policy=allowing, probes=demo_probes, engine_options=ENGINE,
                           cache_dir=shared_cache, progress=False)[0]
    assert "quantized_baseline" in result.screening.flags
    assert "quantized_baseline" in result.record["screening"]["flags"]
    strict_flags = load_policy("strict").fail_on_flags
    gate = dataclasses.replace(allowing, fail_on_flags=strict_flags)
    verdict = decide(result.screening, gate)
    assert verdict.outcome == "fail" and any("quantized_baseline" in r for r in verdict.reasons)


def test_a_gguf_baseline_with_an_hf_candidate_is_cross_engine(smollm2_ladder, smollm2_hf: Path, tmp_path) -> None:
    from pytest_quantsafe.policy import load_policy
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.screen import screen_models
    from pytest_quantsafe.types import GenerationConfig

    policy = dataclasses.replace(load_policy("default"), min_baseline_refusals=1,
                                 generation=GenerationConfig(max_new_tokens=16, batch_size=4))
    result = screen_models(str(smollm2_ladder["F16"]), [str(smollm2_hf)], policy=policy,
                           probes=select(load_probes(), 4, 0), out_dir=tmp_path / "out", engine_options=ENGINE,
                           cache_dir=tmp_path / "cache", progress=False)[0]
    assert "cross_engine" in result.screening.flags
    engine = result.record["engine"]
    assert engine["name"] == "transformers" and engine["baseline_name"] == "llama.cpp"
