"""The generation stage of the pipeline: engines per side, completions through the cache, early exit.

``screen.py`` resolves every artifact through ``Engines`` (one engine instance per engine
name and early-exit setting, created on first use, closed together) and gets each side's
completions with ``complete_side``: cached ones are read, only missing probes go to the engine,
and every finished completion is cached at once, so a killed run resumes
(docs/architecture.md "Data flow").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_quantsafe.engines.base import Engine, detect_engine, get_engine
from pytest_quantsafe.engines.cache import CompletionCache
from pytest_quantsafe.engines.options import option_table
from pytest_quantsafe.engines.progress import GenerationProgress
from pytest_quantsafe.errors import EngineError, PromptTooLongError, UsageError
from pytest_quantsafe.types import Artifact, Completion, GenerationConfig, PrefixRule, Probe, ProbeSet

log = logging.getLogger("quantsafe.screen")

#: Engine option that stops a sequence once the detector can no longer call it a refusal: a bool
#: for callers of ``screen_models``, the detector's ``PrefixRule`` (or None) for the engine.
EARLY_EXIT_OPTION = "early_exit"
#: Engines that implement early exit; for them it is on unless the caller turns it off.
EARLY_EXIT_ENGINES = frozenset({"gguf"})


@dataclass
class Side:
    """One resolved model and the name of the engine that reads it."""

    ref: str
    engine_name: str
    artifact: Artifact


class Engines:
    """Engine instances by (engine name, early exit), created on first use and closed together.

    Early exit stops sequences under ``rule``, the detector's prefix rule; with no rule
    (a detector that must read whole texts) nothing is stopped early.
    """

    def __init__(self, options: Mapping[str, Any], rule: PrefixRule | None) -> None:
        self.options = dict(options)
        self.rule = rule
        self._backends: dict[tuple[str, bool], tuple[Engine, dict[str, Any]]] = {}

    def get(self, name: str, *, full_text: bool = False) -> tuple[Engine, dict[str, Any]]:
        """Return (engine, its options); ``full_text`` forces early exit off."""
        chosen = engine_options_for(name, self.options)
        # With engine "auto" one option set serves every engine a screening uses: each gets
        # the options its table has (a key no engine knows still reaches create, which refuses it).
        own, known = option_table(name), option_table("auto")
        chosen = {k: v for k, v in chosen.items() if k in own or k not in known}
        early = bool(chosen.pop(EARLY_EXIT_OPTION, False)) and not full_text and self.rule is not None
        if name in EARLY_EXIT_ENGINES:
            chosen[EARLY_EXIT_OPTION] = self.rule if early else None
        slot = (name, early)
        if slot not in self._backends:
            self._backends[slot] = (get_engine(name, **chosen), chosen)
        return self._backends[slot]

    def resolve(self, refs: Sequence[str], engine: str) -> list[Side]:
        """Return the resolved sides of ``refs`` (engine detected per reference with "auto")."""
        sides = []
        for ref in refs:
            name = detect_engine(ref) if engine == "auto" else engine
            sides.append(Side(ref=ref, engine_name=name, artifact=self.get(name)[0].resolve(ref)))
        return sides

    def close(self) -> None:
        """Close every engine (their worker processes end)."""
        for backend, _ in self._backends.values():
            backend.close()
        self._backends.clear()


def engine_block(engine_id: str) -> dict[str, str]:
    name, _, version = engine_id.partition("/")
    return {"name": name, "version": version}


def engine_options_for(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the options to create engine ``name`` with: early exit on by default where implemented.

    With the protocol's pattern detector a refusal is decided by its first words, so a
    sequence that can no longer become one needs no more tokens (its length is not a
    feature). A judge or the quality measure needs full texts: pass ``early_exit=False``.
    """
    chosen = dict(options)
    if name in EARLY_EXIT_ENGINES:
        chosen.setdefault(EARLY_EXIT_OPTION, True)
    elif chosen.pop(EARLY_EXIT_OPTION, False):
        raise UsageError(f"the {name} engine cannot stop sequences early", where=f"engine option {EARLY_EXIT_OPTION}",
                         fix=f"drop {EARLY_EXIT_OPTION}, or use an engine that supports it "
                         f"({', '.join(sorted(EARLY_EXIT_ENGINES))})")
    return chosen


def _cache_options(artifact: Artifact, options: Mapping[str, Any], backend: Engine | None = None,
                   config: GenerationConfig | None = None) -> dict[str, Any]:
    """Return what, besides the artifact's files, changes the completions (part of the cache key)."""
    rule = options.get(EARLY_EXIT_OPTION)
    keyed: dict[str, Any] = {EARLY_EXIT_OPTION: isinstance(rule, PrefixRule)}
    if isinstance(rule, PrefixRule):
        # Stopped sequences are as short as the rule makes them: another rule, other completions.
        keyed["early_exit_rule"] = rule.digest
    # The prompt is rendered with this template: a --chat-template override changes every completion.
    template = artifact.metadata.get("chat_template_sha256")
    if template:
        keyed["chat_template_sha256"] = template
    # An engine whose numbers depend on the batch schedule names the schedule (engine.schedule).
    schedule = getattr(backend, "schedule", None)
    if schedule is not None and config is not None:
        keyed["schedule"] = dict(schedule(config))
    return keyed


def whole_units(members: Sequence[Probe], missing: Sequence[Probe], unit: int) -> list[Probe]:
    """Return the probes to hand the engine: every consecutive group of ``unit`` members with a missing probe.

    An engine that decodes fixed groups (``engine.batch_unit``) computes each probe's numbers
    with its group's other probes, so a resumed run regenerates an unfinished group whole:
    the group then has the neighbours it had in an uninterrupted run, and its texts are
    the same byte for byte. The cached probes of such a group are generated again and discarded.
    """
    if unit <= 1 or not missing:
        return list(missing)
    wanted = {p.id for p in missing}
    out: list[Probe] = []
    for start in range(0, len(members), unit):
        group = members[start:start + unit]
        if any(p.id in wanted for p in group):
            out.extend(group)
    return out


def complete_side(side: Side, probe_set: ProbeSet, config: GenerationConfig, cache: CompletionCache, engines: Engines, *,
              full_text_kinds: frozenset[str], progress: bool, label: str) -> tuple[list[Completion], int]:
    """Return (one completion per probe, how many came from the cache): cached ones reused, missing
    ones generated and cached at once.

    Probes of ``full_text_kinds`` go to an engine instance without early exit (under
    their own cache key); the others may stop early.
    """
    groups = []
    for full_text in (False, True):
        members = tuple(p for p in probe_set.items if (p.kind in full_text_kinds) == full_text)
        if members:
            backend, options = engines.get(side.engine_name, full_text=full_text)
            key = cache.key(side.artifact.digest, probe_set.digest, config, backend.engine_id(),
                            _cache_options(side.artifact, options, backend, config))
            cached, missing = cache.lookup(key, members)
            unit = getattr(backend, "batch_unit", None)
            todo = whole_units(members, missing, unit(config) if unit is not None else 1)
            groups.append((backend, key, cached, missing, todo))
    done: dict[str, Completion] = {}
    for _, _, cached, _, _ in groups:
        done.update(cached)
    from_cache = len(done)
    with GenerationProgress(label, len(probe_set.items), cached=len(done), enabled=progress) as bar:
        for backend, key, _, missing, todo in groups:
            if not missing:
                continue
            wanted = {p.id for p in missing}
            if len(todo) > len(missing):
                log.info("%s: %d cached completion(s) are generated again with their unfinished batch group "
                         "(the group's numbers depend on all its probes) and discarded", label,
                         len(todo) - len(missing))

            def on_result(completion: Completion, key: str = key, wanted: set[str] = wanted) -> None:
                if completion.probe_id not in wanted or completion.probe_id in done:
                    return
                cache.append(key, completion)
                done[completion.probe_id] = completion
                bar.update(completion)

            try:
                for completion in backend.generate(side.artifact, todo, config, on_result=on_result):
                    on_result(completion)  # a no-op for those the engine already reported
            except PromptTooLongError as exc:
                # Only here is the probe file known: name it, with the probe id and the context size.
                raise PromptTooLongError(exc.message, probe_id=exc.probe_id,
                                         where=f"{probe_set.source or probe_set.name}: probe {exc.probe_id}",
                                         fix=exc.fix) from None
    log.info(bar.summary())
    lost = [p.id for p in probe_set.items if p.id not in done]
    if lost:
        raise EngineError(f"the engine returned no completion for {len(lost)} probe(s), e.g. {lost[0]!r}",
                          where=side.ref, fix="rerun; completed generations are cached")
    return [done[p.id] for p in probe_set.items], from_cache


def cache_block(cache: Any, baseline_cached: int, candidate_cached: int, n_probes: int) -> dict[str, Any]:
    """Return the record's ``cache`` provenance: what was read from the completion cache, and how it is trusted."""
    return {
        "read": bool(cache.read),
        "authentication": "hmac-sha256 (per-machine key outside the cache folder)",
        "baseline_from_cache": baseline_cached,
        "candidate_from_cache": candidate_cached,
        "generated": 2 * n_probes - baseline_cached - candidate_cached,
        "dropped_corrupt": cache.stats.corrupt,
        "dropped_unauthenticated": cache.stats.forged,
    }
