"""The validation matrix's outputs: the Markdown of docs/validation.md, the cpu-matrix profile, the delta table.

Called by ``validation_matrix.py`` at the end of a run with that run's cells and the
``quantsafe calibrate`` result; every number written comes from that one run. The
generated part of docs/validation.md sits between ``<!-- matrix:start -->`` and
``<!-- matrix:end -->``; text outside the markers (the discussion) is kept.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pytest_quantsafe.measure.paired import lost_refusals_text
from pytest_quantsafe.results import Bands
from pytest_quantsafe.score.calibration import load_calibration
from pytest_quantsafe.score.fit import FALLBACK_DANGER_DROP, danger_labels, loocv
from pytest_quantsafe.score.ingest import read_matrix
from pytest_quantsafe.score.rtsi import score_deltas
from pytest_quantsafe.types import FEATURE_NAMES

START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
DOC = Path("docs/validation.md")
PROFILE = Path("pytest_quantsafe/policies/calibration/cpu-matrix.yaml")
MATRIX_CSV = Path("docs/validation-matrix.csv")
SHORT = {"dominant_prefix_share": "Δdom", "unique_prefix_rate": "Δuniq", "prefix_entropy_norm": "Δent",
         "mean_tokens_refusal": "Δtok"}


def _size(record: Mapping[str, Any]) -> int:
    return sum(int(f["size"]) for f in record["candidate"]["artifact"]["files"])


def _base_size(record: Mapping[str, Any]) -> int:
    return sum(int(f["size"]) for f in record["baseline"]["artifact"]["files"])


def _rate(profile: Mapping[str, Any]) -> str:
    return f"{profile['n_refusals']}/{profile['n_total']} ({100 * profile['refusal_rate']:.1f}%)"


def _num(x: Any, fmt: str = "{:+.3f}") -> str:
    return "–" if x is None else fmt.format(float(x))


def cell_row(cell: Any) -> list[str]:
    """Return one Markdown table row of a cell (a screened cell's numbers, else its status and reason)."""
    head = [cell.source, cell.fmt, cell.engine]
    if cell.record is None:
        return [*head, str(cell.bits), "–", "–", f"**{cell.status}**: {cell.reason}", *["–"] * 9]
    rec = cell.record
    s = rec["screening"]
    base_bytes = _base_size(rec)
    full_bits = 16 if cell.engine == "gguf" else 32
    bpw = 8 * _size(rec) / (base_bytes * 8 / full_bits)  # bits per baseline weight, files included
    quality = s.get("quality") or {}
    q = quality.get("quality_delta_pp") if quality.get("status") == "measured" else None
    ci = s.get("rtsi_ci")
    rtsi = "–" if s["rtsi"] is None else f"{s['rtsi']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    band = s["band"] or s["status"]
    if s.get("flags"):
        band += f" ({', '.join(s['flags'])})"
    deltas = s.get("deltas") or {}
    return [*head, f"{cell.bits} / {bpw:.2f}", f"{_size(rec) / 1e6:.0f}",
            f"{_rate(rec['baseline']['profile'])} → {_rate(rec['candidate']['profile'])}",
            lost_refusals_text(s.get("paired")),
            *[_num(deltas.get(f), "{:+.3f}" if f != "mean_tokens_refusal" else "{:+.2f}") for f in FEATURE_NAMES],
            rtsi, band, _num(q, "{:+.1f} pp"), str(s.get("regime")), rec["verdict"]["outcome"]]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def calibration_section(cal: Mapping[str, Any], csv_path: Path | None) -> list[str]:
    """Return the recalibration section: weights and ranges next to the paper's, LOOCV per danger cell."""
    lines = ["## Recalibration on these cells", ""]
    lines.append(f"Command (on the delta table of the screened cells, `{MATRIX_CSV}`): `{cal['command']}`; "
                 f"exit {cal['exit_code']}.")
    if cal["exit_code"] != 0 or csv_path is None:
        err = cal["document"].get("error") or {}
        lines += ["", f"**calibrate refused these cells**: {err.get('message') or cal['stderr'].strip()}"
                  + (f" (fix: {err['fix']})" if err.get("fix") else ""), ""]
        return lines
    report = cal["report"]
    paper = load_calibration("default")
    prov = paper.provenance
    labels_text = f"{report['n_rows']} rows; danger labels: {report['danger_labels']} ({report['danger_rows']} rows)."
    lines += ["", labels_text, ""]
    rows = []
    for f in FEATURE_NAMES:
        lo, hi = report["ranges"][f]
        plo, phi = paper.ranges[f]
        rows.append([f, f"{float(prov['abs_pearson_r'][f]):.4f}", f"{report['abs_pearson_r'][f]:.4f}",
                     f"{paper.weights[f]:.4f}", f"{report['weights'][f]:.4f}", f"[{plo:.4g}, {phi:.4g}]",
                     f"[{lo:.4g}, {hi:.4g}]"])
    lines += _table(["feature", "paper |r|", "here |r|", "paper weight", "here weight", "paper range",
                     "here range"], rows)
    delta_rows, _ = read_matrix(csv_path)
    labels, _source = danger_labels(delta_rows)
    loo = loocv(delta_rows, labels, Bands())
    here = load_calibration(PROFILE_TMP[0]) if PROFILE_TMP else None
    loo_text = (f"Leave-one-out (weights and ranges refit without the held-out cell, bands 0.10 / 0.40): "
                f"**{loo.recall}** cells whose refusal rate fell ≥ {100 * FALLBACK_DANGER_DROP:.0f} pp kept out "
                f"of LOW; LOW bucket {loo.low_count}/{len(delta_rows)} (paper: 10/10, 23/45). "
                f"Leave-one-family-out AUC: {_num(report['family_auc']['pooled_auc'], '{:.3f}')} over "
                f"{report['family_auc']['n_families']} families.")
    lines += ["", loo_text, ""]
    table = []
    for i, row in enumerate(delta_rows):
        paper_score = score_deltas(row.deltas, paper)[0]
        in_sample = score_deltas(row.deltas, here)[0] if here is not None else math.nan
        table.append([f"{row.model}:{row.variant}", f"{100 * float(row.refusal_rate_delta or 0):+.1f} pp",
                      "yes" if labels[i] else "no",
                      f"{paper_score:.3f} {paper.bands.classify(paper_score)}",
                      f"{in_sample:.3f} {Bands().classify(in_sample)}",
                      f"{loo.scores[i]:.3f} {loo.bands[i]}"])
    lines += _table(["cell", "refusal Δ", "danger label", "paper profile", "cpu-matrix (in-sample)",
                     "LOOCV (held out)"], table)
    lines += ["", "Table 3 on these cells (matched LOW bucket, in-sample):", ""]
    lines += _table(["screen", "routed", "LOW bucket"],
                    [[t["screen"], f"{t['routed']}/{t['danger_total']}", f"{t['low_bucket']}/{t['n_rows']}"]
                     for t in report["table3"]])
    return lines


#: Path of the profile written this run (set by ``finish`` before the section is built).
PROFILE_TMP: list[Path] = []


def profile_text(cal: Mapping[str, Any], context: Mapping[str, Any], cells: Sequence[Any]) -> str:
    """Return the calibrate output with the run's provenance added (what, where, when, which cells)."""
    data = yaml.safe_load(cal["yaml"])
    screened = [c.cell_id for c in cells if c.record is not None and c.record["screening"]["status"] == "scored"]
    data["description"] = ("RTSI weights and ranges refit on the CPU validation matrix (docs/validation.md): "
                           "SmolLM2-135M refuser and Qwen2.5-Coder-0.5B, GGUF k-quants and HF quantizers "
                           "against full precision on the default probes. Small n: a profile for this stack, "
                           "not a replacement of the paper's.")
    prov = data["provenance"]
    prov["source"] = (f"benchmarks/validation_matrix.py run of {context['started']}: {len(screened)} screened "
                      f"cells; the delta table is {MATRIX_CSV} (its sha256 is source_matrix_sha256)")
    prov["command"] = context["argv"]
    prov["machine"] = context["machine_start"]
    prov["cells"] = screened
    baselines = {(c.source, c.engine) for c in cells if c.cell_id in screened}  # F16 and fp32 rows
    if screened:
        prov["n_total_cells"] = len(screened) + len(baselines)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def markdown(cells: Sequence[Any], cal: Mapping[str, Any], context: Mapping[str, Any], csv_path: Path | None
             ) -> str:
    """Return the generated part of docs/validation.md."""
    screened = [c for c in cells if c.record is not None]
    produced = f"Produced by one run of `{context['argv']}` (started {context['started']}, {context['wall_s']} s wall)."
    where = f"Machine: {context['machine_start']} at the start; {context['machine_end']} at the end."
    lines = [START, "", produced, "", where, "",
             "Recipes (fixed in the zoo before the run; nothing tuned on probes or results):", ""]
    lines += _table(["format", "engine", "nominal bits", "recipe"],
                    [[f, e, str(b), r] for f, (e, b, r) in context["recipes"].items()])
    baselines = ("Baselines: the F16 rung for the GGUF cells (llama.cpp), the fp32 checkpoint the quantizers "
                 "started from for the HF cells (transformers); every candidate is screened against its own "
                 "engine's baseline, so no pair is cross-engine.")
    count = (f"**{len(screened)} of {len(cells)} cells screened.** Each row is one full default-probe screening "
             "(`screen.screen_models`, default policy, the shipped 130 harmful + 64 benign probes); bits are "
             "nominal / file bits per baseline weight; size is the candidate's files; lost refusals are "
             "`screening.paired` (Wilson 95%).")
    lines += ["", baselines, "", count, ""]
    header = ["model", "format", "engine", "bits", "MB", "refusal baseline → candidate", "lost refusals",
              *[SHORT[f] for f in FEATURE_NAMES], "RTSI [95% CI]", "band", "quality Δ", "regime", "verdict"]
    lines += _table(header, [cell_row(c) for c in cells])
    missing = [c for c in cells if c.record is None]
    if missing:
        lines += ["", "Not screened in this run:", ""]
        lines += [f"- {c.cell_id}: {c.status}: {c.reason}" for c in missing]
    lines += ["", "Seconds per cell (producing the artifact when not cached, generating what the completion "
              "cache lacks, scoring, quality): " + ", ".join(f"{c.cell_id} {c.seconds:.0f}" for c in cells
                                                          if c.status != "not run") + ".", ""]
    lines += calibration_section(cal, csv_path)
    lines += ["", END]
    return "\n".join(lines)


def _splice(old: str, block: str) -> str:
    if START in old and END in old:
        return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: block, old, count=1, flags=re.DOTALL)
    return (old.rstrip() + "\n\n" if old.strip() else "# Validation matrix on this CPU\n\n") + block + "\n"


def finish(cells: Sequence[Any], cal: Mapping[str, Any], context: Mapping[str, Any], *, root: Path,
           write: bool) -> int:
    """Write (or print) the report and the profile; return 0, or 1 when calibrate could not run on the cells."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / MATRIX_CSV.name
        csv_path.write_text(cal["csv"])
        ok = cal["exit_code"] == 0
        if ok:
            profile = Path(tmp) / "cpu-matrix.yaml"
            profile.write_text(profile_text(cal, context, cells))
            load_calibration(profile)  # the product's loader: schema and provenance
            PROFILE_TMP[:] = [profile]
        block = markdown(cells, cal, context, csv_path if ok else None)
        if write:
            doc = root / DOC
            doc.write_text(_splice(doc.read_text() if doc.is_file() else "", block))
            if ok:  # the delta table is kept only with the profile fitted on it
                (root / MATRIX_CSV).write_text(cal["csv"])
                (root / PROFILE).write_text(profile.read_text())
            print(f"wrote {DOC}" + (f", {MATRIX_CSV}, {PROFILE}" if ok else ""), file=sys.stderr)
        print(block)
    return 0 if ok else 1
