"""``report.html``: a self-contained page over every candidate of a screening run.

Built from the records a run wrote (``record/run.py``), so ``quantsafe report OUT``
rebuilds it from a downloaded folder. Self-contained: inline CSS, SVG charts drawn here
(no script, font or style is fetched); the page is complete without JavaScript, and a
few lines of inline script only add filters to the per-probe tables. Bands are named in
text and drawn with a pattern, colours are the Okabe-Ito palette (never red/green
alone). See docs/architecture.md "Output folder layout".
"""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path
from typing import Any

from pytest_quantsafe import __version__
from pytest_quantsafe._util import write_atomic
from pytest_quantsafe.record.run import RunEntry, bits_per_weight, load_run, quantization_of
from pytest_quantsafe.types import FEATURE_NAMES, LIMITS_SENTENCE

REPORT_NAME = "report.html"
#: Chart geometry (px): label column, plot width, row height.
LABEL_W, PLOT_W, ROW_H = 220, 520, 30
#: Feature colours (Okabe-Ito) and patterns, so contributions read in grey print too.
FEATURE_STYLE = {
    "dominant_prefix_share": ("#0072B2", "solid"),
    "unique_prefix_rate": ("#E69F00", "hatch"),
    "prefix_entropy_norm": ("#009E73", "dots"),
    "mean_tokens_refusal": ("#CC79A7", "cross"),
}
BAND_PATTERN = {"LOW": "none", "MODERATE": "hatch", "HIGH": "cross", None: "dots"}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def short(name: str, limit: int = 30) -> str:
    """Return ``name`` cut to ``limit`` characters from the right (rung names differ at the end)."""
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _x(value: float, top: float) -> float:
    return round(LABEL_W + PLOT_W * max(0.0, min(value, top)) / top, 1)


def _chart(rows: list[dict[str, Any]], top: float, ticks: list[float], fmt: str) -> dict[str, Any]:
    for row in rows:  # every row has every key the template tests against none
        for key in ("side", "band", "x", "lo", "hi"):
            row.setdefault(key, None)
    return {"rows": rows, "height": ROW_H * len(rows) + 40, "width": LABEL_W + PLOT_W + 280,
            "ticks": [{"x": _x(t, top), "label": fmt.format(t)} for t in ticks], "plot_bottom": ROW_H * len(rows) + 5,
            "thresholds": []}


def rtsi_chart(entries: list[RunEntry]) -> dict[str, Any]:
    """Return the RTSI chart: a dot per rung, its bootstrap interval, and the band thresholds."""
    highs = [_num(e.record["screening"].get("rtsi")) or 0.0 for e in entries]
    highs += [(_num((e.record["screening"].get("rtsi_ci") or [0, 0])[1]) or 0.0) for e in entries]
    bands = entries[0].record.get("policy", {}).get("bands") or entries[0].record["calibration"]["bands"]
    top = min(1.0, max(0.5, 1.15 * max(highs + [float(bands["high"])])))
    rows = []
    for i, e in enumerate(entries):
        s = e.record["screening"]
        rtsi, ci = _num(s.get("rtsi")), s.get("rtsi_ci")
        rows.append({"y": i * ROW_H + 15, "label": short(e.name), "band": s.get("band"),
                     "x": _x(rtsi, top) if rtsi is not None else None,
                     "lo": _x(float(ci[0]), top) if ci else None, "hi": _x(float(ci[1]), top) if ci else None,
                     "text": f"{rtsi:.3f}" if rtsi is not None else "no RTSI (insufficient data)"})
    chart = _chart(rows, top, [round(top * k / 5, 2) for k in range(6)], "{:.2f}")
    chart["thresholds"] = [{"x": _x(float(bands[b]), top), "label": f"{b.upper()} ≥ {float(bands[b]):g}"}
                           for b in ("moderate", "high")]
    return chart


def _rate_rows(entries: list[RunEntry]) -> list[dict[str, Any]]:
    rows = []
    for i, e in enumerate(entries):
        for j, side in enumerate(("baseline", "candidate")):
            p = e.record[side]["profile"]
            lo, hi = p.get("refusal_rate_ci") or (p["refusal_rate"], p["refusal_rate"])
            rows.append({"y": (2 * i + j) * ROW_H + 15, "label": short(e.name) if j else "baseline",
                         "side": side, "band": e.record["screening"].get("band") if j else None,
                         "x": _x(p["refusal_rate"], 1.0), "lo": _x(lo, 1.0), "hi": _x(hi, 1.0),
                         "text": f"{side} {p['refusal_rate']:.0%} [{lo:.0%}–{hi:.0%}] ({p['n_refusals']}/{p['n_total']})"})
    return rows


def refusal_chart(entries: list[RunEntry]) -> dict[str, Any]:
    """Return the harmful refusal-rate chart: baseline and candidate per rung with Wilson intervals."""
    rows = _rate_rows(entries)
    return _chart(rows, 1.0, [k / 5 for k in range(6)], "{:.0%}")


def lost_chart(entries: list[RunEntry]) -> dict[str, Any] | None:
    """Return the lost-refusal chart (paired evidence) or None when no record has a paired block."""
    if not any((e.record["screening"].get("paired") or None) for e in entries):
        return None
    rows = []
    for i, e in enumerate(entries):
        paired = e.record["screening"].get("paired") or {}
        rate, ci = _num(paired.get("lost_refusal_rate")), paired.get("lost_refusal_ci")
        lost = (paired.get("harmful") or {}).get("lost_refusal")
        rows.append({"y": i * ROW_H + 15, "label": short(e.name), "x": _x(rate, 1.0) if rate is not None else None,
                     "lo": _x(float(ci[0]), 1.0) if ci else None, "hi": _x(float(ci[1]), 1.0) if ci else None,
                     "text": (f"{rate:.0%} ({lost}/{paired.get('at_risk')} at risk)" if rate is not None
                              else "not measured")})
    return _chart(rows, 1.0, [k / 5 for k in range(6)], "{:.0%}")


def quality_chart(entries: list[RunEntry]) -> dict[str, Any] | None:
    """Return the benign-answer quality Δ chart (pp, bars from zero) or None when nothing was measured."""
    values = [_num((e.record["screening"].get("quality") or {}).get("quality_delta_pp")) for e in entries]
    measured = [abs(v) for v in values if v is not None]
    if not measured:
        return None
    span = max(10.0, *measured)
    zero = LABEL_W + PLOT_W / 2
    rows = []
    for i, (e, v) in enumerate(zip(entries, values)):
        x = zero + (PLOT_W / 2) * (v / span) if v is not None else None
        rows.append({"y": i * ROW_H + 15, "label": short(e.name), "x0": min(zero, x) if x is not None else zero,
                     "w": abs(x - zero) if x is not None else 0,
                     "text": f"{v:+.1f} pp" if v is not None else "not measured"})
    chart = _chart(rows, 1.0, [], "")
    chart["ticks"] = [{"x": round(zero + (PLOT_W / 2) * k / 2, 1), "label": f"{span * k / 2:+.0f}"}
                      for k in (-2, -1, 0, 1, 2)]
    chart["zero"] = zero
    return chart


def contributions_bar(record: dict[str, Any]) -> dict[str, Any]:
    """Return the stacked bar of the four feature contributions (their sum is RTSI)."""
    contributions = record["screening"].get("contributions") or {}
    total = sum(float(contributions.get(f, 0.0)) for f in FEATURE_NAMES)
    scale = PLOT_W / max(0.5, total)  # the same RTSI axis for every candidate, at least 0..0.5
    x, segments = 0.0, []
    for f in FEATURE_NAMES:
        value = float(contributions.get(f, 0.0))
        colour, pattern = FEATURE_STYLE[f]
        segments.append({"feature": f, "x": round(x, 1), "w": round(value * scale, 1), "value": value,
                         "colour": colour, "pattern": pattern})
        x += value * scale
    return {"segments": segments, "total": total, "width": PLOT_W + 10}


def candidate_view(e: RunEntry) -> dict[str, Any]:
    """Return what the page shows of one candidate."""
    r = e.record
    s, v = r["screening"], r["verdict"]
    rules = v.get("rules") or []
    samples = e.samples
    flips = Counter(row["flip"] for row in samples) if samples is not None else Counter()
    return {
        "name": e.name, "anchor": "c-" + e.name.replace(".", "-"), "band": s.get("band"), "status": s.get("status"),
        "rtsi": _num(s.get("rtsi")), "rtsi_ci": s.get("rtsi_ci"), "flags": list(s.get("flags") or []),
        "regime": s.get("regime"), "quantization": quantization_of(r), "bits": bits_per_weight(quantization_of(r)),
        "verdict": v, "broken": [rule for rule in rules if not rule.get("passed", True)], "rules": rules,
        "features": [{"name": f, "delta": (s.get("deltas") or {}).get(f), "phi": (s.get("phi") or {}).get(f),
                      "contribution": (s.get("contributions") or {}).get(f),
                      "weight": (r["calibration"].get("weights") or {}).get(f)} for f in FEATURE_NAMES],
        "bar": contributions_bar(r), "baseline": r["baseline"], "candidate": r["candidate"],
        "engine": r.get("engine") or {}, "probe_set": r["probe_set"], "policy": r.get("policy") or {},
        "calibration": r["calibration"], "quality": s.get("quality") or {}, "paired": s.get("paired"),
        "band_stability": s.get("band_stability"), "created": r.get("created"),
        "samples": samples, "flip_counts": sorted(flips.items()),
        "categories": sorted({str(row.get("category")) for row in samples or []}),
    }


def render_report(entries: list[RunEntry], *, title: str | None = None) -> str:
    """Return the HTML page for the run's candidates (already in quantization order)."""
    import jinja2  # the one heavy import, only when a report is made

    env = jinja2.Environment(loader=jinja2.PackageLoader("pytest_quantsafe.record", "templates"),
                             autoescape=True, undefined=jinja2.ChainableUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["f"] = lambda v, d=3: "–" if _num(v) is None else f"{float(v):.{d}f}"
    env.filters["pct"] = lambda v: "–" if _num(v) is None else f"{100 * float(v):.1f}%"
    baseline = entries[0].record["baseline"]["artifact"]
    return env.get_template("report.html.j2").render(
        title=title or f"quantsafe report: {baseline.get('name') or 'screening'}",
        candidates=[candidate_view(e) for e in entries], rtsi=rtsi_chart(entries), refusal=refusal_chart(entries),
        lost=lost_chart(entries), quality=quality_chart(entries), limits=LIMITS_SENTENCE,
        baseline=baseline, feature_style=FEATURE_STYLE, band_pattern=BAND_PATTERN, version=__version__,
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        n_samples=sum(len(e.samples or []) for e in entries))


def write_report(out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` from the records under ``out_dir`` and return its path."""
    path = out_dir / REPORT_NAME
    write_atomic(path, render_report(load_run(out_dir)))
    return path
