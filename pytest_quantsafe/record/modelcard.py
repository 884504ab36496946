"""A model-card section for Hugging Face from a screening run (``quantsafe model-card OUT_DIR``).

Markdown ready to paste into a quantized model's README: one table per candidate, the
limits sentence, how to verify the signed record, and the YAML front matter the section
implies (``base_model``, ``base_model_relation: quantized``), written through
``huggingface_hub``'s ``ModelCardData`` so the hub reads it as it reads its own. The
hub library is the ``hf`` extra and is imported only here. See docs/architecture.md
"Front doors".
"""

from __future__ import annotations

import re
from typing import Any

from pytest_quantsafe.errors import UsageError
from pytest_quantsafe.record.run import RunEntry, quantization_of
from pytest_quantsafe.types import LIMITS_SENTENCE

#: ``org/name`` as the hub spells a repository id.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_of(entries: list[RunEntry]) -> str:
    """Return the baseline's hub repository id when the record names one, else its name."""
    artifact = entries[0].record["baseline"]["artifact"]
    ref = str(artifact.get("ref") or "")
    if ref.startswith("hf://"):
        return ref[len("hf://"):].split("@")[0].split("#")[0]
    for key in ("repo_id", "base_model"):
        value = (artifact.get("metadata") or {}).get(key)
        if value:
            return str(value)
    return str(artifact.get("name") or ref)


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "–"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def candidate_table(entry: RunEntry) -> list[str]:
    """Return the Markdown table of one candidate."""
    r = entry.record
    s, v = r["screening"], r["verdict"]
    ci = s.get("rtsi_ci")
    b, c = r["baseline"]["profile"], r["candidate"]["profile"]
    paired = s.get("paired") or {}
    quality = s.get("quality") or {}
    broken = [rule["rule"] for rule in v.get("rules") or [] if not rule.get("passed", True)]
    rows = [
        ("quantization", quantization_of(r)),
        ("band", s.get("band") or "none (insufficient data)"),
        ("RTSI", _num(s.get("rtsi")) + (f" (95% bootstrap {_num(ci[0], 3)}–{_num(ci[1], 3)})" if ci else "")),
        ("harmful refusal rate", (f"{_pct(b.get('refusal_rate'))} baseline → {_pct(c.get('refusal_rate'))} "
                                 f"candidate ({c.get('n_refusals')}/{c.get('n_total')})")),
        ("lost refusals (paired)", (f"{paired['harmful']['lost_refusal']}/{paired.get('at_risk')} "
                                    f"({_pct(paired.get('lost_refusal_rate'))})") if paired else "not measured"),
        ("benign-answer quality Δ", f"{quality['quality_delta_pp']:+.1f} pp"
         if quality.get("status") == "measured" else "not measured"),
        ("flags", ", ".join(s.get("flags") or []) or "none"),
        ("verdict", f"{v.get('outcome')} under policy `{(r.get('policy') or {}).get('name')}`"
                    + (f" (broken: {', '.join(broken)})" if broken else "")),
        ("artifact sha256", f"`{r['candidate']['artifact'].get('digest')}`"),
        ("probe set", (f"{r['probe_set'].get('name')} ({r['probe_set'].get('n_harmful')} harmful + "
                      f"{r['probe_set'].get('n_benign')} benign)")),
        ("engine", f"{(r.get('engine') or {}).get('name')} {(r.get('engine') or {}).get('version')}"),
        ("calibration", f"{r['calibration'].get('name')} (`{str(r['calibration'].get('digest'))[:12]}`)"),
    ]
    return [f"#### {_cell(entry.name)}", "", "| | |", "|---|---|", *[f"| {k} | {_cell(val)} |" for k, val in rows], ""]


def _signature_lines(entries: list[RunEntry]) -> list[str]:
    signed = [(e.name, p.name) for e in entries for p in sorted(e.path.parent.glob("*.sigstore.json"))
              + sorted(e.path.parent.glob("*.dsse.json"))]
    lines = ["### Verifying the screening record", ""]
    if signed:
        lines += ["Signed records shipped with this run: " + ", ".join(f"`{n}/{f}`" for n, f in signed) + ".", ""]
    lines += [("Each record is signed as an in-toto attestation whose subjects are the model files. Check the "
              "signature, the signer and that the files are the ones screened:"), "", "```sh",
              "pip install 'pytest-quantsafe[sign]'",
              "quantsafe verify MODEL.gguf.quantsafe.sigstore.json --artifact MODEL.gguf \\",
              "  --issuer https://token.actions.githubusercontent.com --repository OWNER/REPO",
              "# a record signed with a local key instead:",
              "quantsafe verify record.dsse.json --artifact MODEL.gguf --key release.pub.pem", "```", ""]
    return lines


def model_card_section(entries: list[RunEntry], *, base_model: str | None = None) -> dict[str, Any]:
    """Return the section: ``markdown`` (body), ``metadata`` (front-matter keys) and ``card`` (both)."""
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        raise UsageError("model-card needs huggingface_hub, which is in the hf extra",
                         fix="pip install 'pytest-quantsafe[hf]' (or pip install huggingface_hub)") from None
    base = base_model or base_model_of(entries)
    data = ModelCardData(base_model=base, base_model_relation="quantized", tags=["quantsafe", "quantized"])
    lines = ["## Refusal-drift screening (quantsafe)", "",
             (f"Each quantization was screened against its full-precision baseline **{_cell(base)}** for "
             "refusal-template drift (RTSI) on harmful and benign probes."), "",
             "| candidate | band | RTSI | harmful refusal rate | verdict |", "|---|---|---:|---|---|"]
    for e in entries:
        s = e.record["screening"]
        lines.append(f"| {_cell(e.name)} | {s.get('band') or 'none'} | {_num(s.get('rtsi'))} | "
                     f"{_pct(e.record['candidate']['profile'].get('refusal_rate'))} | {e.record['verdict'].get('outcome')} |")
    lines += ["", "### Per candidate", ""]
    for e in entries:
        lines += candidate_table(e)
    lines += [f"> {LIMITS_SENTENCE}", "", *_signature_lines(entries)]
    markdown = "\n".join(lines)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{markdown}")
    return {"markdown": markdown, "metadata": data.to_dict(), "card": str(card),
            "base_model_is_repo_id": bool(REPO_ID.match(base))}
