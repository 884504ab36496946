"""report.html from real records (screen_profiles on the packaged SmolLM2 file), read back as HTML.

The browser tests (tests/test_report_browser.py) open a real ladder in chromium; these fast
tests check the page's content against the records without a browser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_quantsafe.cli import main
from pytest_quantsafe.cli.jsonout import load_schema
from pytest_quantsafe.record.html import render_report
from pytest_quantsafe.record.run import bits_per_weight, load_run
from pytest_quantsafe.types import LIMITS_SENTENCE

REPO = Path(__file__).resolve().parent.parent
FLIPS = ["kept_refusal"] * 5 + ["lost_refusal"] * 2 + ["kept_compliance"] * 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """An output folder with three real records (Q8_0 LOW, Q2_K HIGH, Q4_K_M LOW) and samples for one."""
    from test_attest import make_record

    out = tmp_path_factory.mktemp("run")
    for name, kind, quant in (("m.Q2_K.gguf", "high", "Q2_K"), ("m.Q8_0.gguf", "low", "Q8_0"),
                              ("m.Q4_K_M.gguf", "low", "Q4_K_M")):
        record: dict[str, Any] = make_record(smollm2_gguf, kind)
        record["candidate"]["artifact"]["quantization"] = quant
        (out / name).mkdir()
        (out / name / "record.json").write_text(json.dumps(record), encoding="utf-8")
    rows = [{"id": f"h{i:03d}", "kind": "harmful", "category": ("cyber", "fraud")[i % 2], "flip": flip,
             "baseline": {"label": "refusal", "prefix": "i m sorry but i", "n_tokens": 12},
             "candidate": {"label": "answer" if flip == "lost_refusal" else "refusal",
                           "prefix": "<script>alert(1)</script>", "n_tokens": 40}} for i, flip in enumerate(FLIPS)]
    (out / "m.Q2_K.gguf" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_rungs_are_in_quantization_order(run_dir: Path) -> None:
    assert [e.name for e in load_run(run_dir)] == ["m.Q8_0.gguf", "m.Q4_K_M.gguf", "m.Q2_K.gguf"]
    assert bits_per_weight("GPTQ-INT4") == 4.0 and bits_per_weight("int8") == 8.0 and bits_per_weight("x") is None


def test_page_shows_every_candidate_as_recorded(run_dir: Path) -> None:
    from test_report_browser import _dom

    html = render_report(load_run(run_dir))
    dom = _dom(html)
    records = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/record.json")}
    assert {r["candidate"]: r["band_text"] for r in dom.rungs} == {
        n: r["screening"]["band"] for n, r in records.items()}
    for row in dom.rungs:
        assert row["rtsi_text"] == f"{records[row['candidate']]['screening']['rtsi']:.4f}"
    [probes] = dom.probes.values()
    assert sorted(p["data-flip"] for p in probes) == sorted(FLIPS)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # sample text is escaped, never markup
    assert html.count(LIMITS_SENTENCE) == 2 and "Rule broken: <code>band</code>" in html
    assert not [u for u in dom.urls if u.startswith(("http:", "https:", "//"))]
    assert "<link" not in html and "src=" not in html


def test_report_command_writes_the_page(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--output", str(target)]) == 0
    assert "3 candidate(s)" in capsys.readouterr().out and target.stat().st_size > 5000
    proc = subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", "report", str(run_dir), "--json"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    doc = json.loads(proc.stdout)
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    assert doc["result"]["n_samples"] == len(FLIPS) and (run_dir / "report.html").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no such output folder" in capsys.readouterr().err
