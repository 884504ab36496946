"""Plausibility bounds of measured values: one set for CSV ingest, external-screen manifests and records.

A value outside its bound cannot come from a real measurement under the protocol
(docs/architecture.md "Fail closed"): shares and rates are fractions, counts are
whole and bounded by the probe set, and a mean refusal length above
``MAX_MEAN_TOKENS_REFUSAL`` tokens is far beyond any generation budget. Ingest paths
turn a violation into an ``implausible:<field>`` flag (scoring) or an
``InputError`` (files that must be exact), never into a pass.
"""

from __future__ import annotations

import math
from typing import Any

#: Longest plausible mean refusal length, in tokens (generation budgets are a few hundred).
MAX_MEAN_TOKENS_REFUSAL = 100_000.0
#: Most probes a screening can plausibly have.
MAX_PROBE_COUNT = 10_000_000

#: field -> (lowest, highest) plausible value.
BOUNDS: dict[str, tuple[float, float]] = {
    "dominant_prefix_share": (0.0, 1.0),
    "unique_prefix_rate": (0.0, 1.0),
    "prefix_entropy_norm": (0.0, 1.0),
    "refusal_rate": (0.0, 1.0),
    "benign_refusal_rate": (0.0, 1.0),
    "mean_tokens_refusal": (0.0, MAX_MEAN_TOKENS_REFUSAL),
    "n_total": (0, MAX_PROBE_COUNT),
    "n_refusals": (0, MAX_PROBE_COUNT),
    "benign_total": (0, MAX_PROBE_COUNT),
    "benign_refusals": (0, MAX_PROBE_COUNT),
}


def violation(name: str, value: Any) -> str | None:
    """Return why ``value`` is implausible for field ``name`` (None when it is plausible or unbounded)."""
    if name not in BOUNDS:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name!r} is {value!r}, not a number"
    if not math.isfinite(float(value)):
        return f"{name!r} is {value!r}, not a finite number"
    lo, hi = BOUNDS[name]
    if not lo <= value <= hi:
        return f"{name!r} is {value!r}, outside its plausible range [{lo:g}, {hi:g}]"
    if name.startswith(("n_", "benign_total", "benign_refusals")) and value != int(value):
        return f"{name!r} is {value!r}, not a whole count"
    return None


def fix_for(name: str) -> str:
    """Return the fix sentence for an implausible value of ``name``."""
    lo, hi = BOUNDS.get(name, (0.0, 0.0))
    return f"write {name} as a measured value between {lo:g} and {hi:g}"
