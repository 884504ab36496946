"""``--json`` on every command that prints a result: one document on stdout, valid under the shipped schema.

Each command runs in a child process on real inputs (real policies, a real CSV, a real
calibration matrix, real records signed with a real key), so "exactly one JSON document on
stdout" is checked at the process boundary, with human text on stderr and the same exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_quantsafe.cli.jsonout import load_schema
from pytest_quantsafe.types import LIMITS_SENTENCE

REPO = Path(__file__).resolve().parent.parent
HEADER = ("cell_id,is_baseline,dominant_prefix_share,unique_prefix_rate,prefix_entropy_norm,"
          "mean_refusal_token_length,n_refusals,n_total")
VALIDATOR = jsonschema.Draft202012Validator(load_schema())


def run_json(*argv: str, timeout: float = 300) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """Run ``quantsafe ARGV --json``; return the validated document and the process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", *argv, "--json"], capture_output=True,
                          text=True, check=False, cwd=REPO, timeout=timeout, env=env)
    doc = json.loads(proc.stdout)  # the whole of stdout is one document
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert doc["exit_code"] == proc.returncode
    assert "Traceback" not in proc.stderr
    return doc, proc


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_policy_check_and_diff() -> None:
    doc, proc = run_json("policy", "check", "strict")
    assert doc["command"] == "policy check" and doc["result"]["name"] == "strict"
    assert "policy strict: valid" in proc.stderr  # the human text moved to stderr
    doc, proc = run_json("policy", "diff", "strict", "default", "--fail-on-loosen")
    assert proc.returncode == 1 and doc["result"]["summary"]["loosens"] >= 1
    assert all(c["direction"] in ("tightens", "loosens", "changes") for c in doc["result"]["changes"])


def test_an_error_is_one_error_document(tmp_path: Path) -> None:
    doc, proc = run_json("policy", "check", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and doc["error"]["where"] == str(tmp_path / "missing.yaml")
    assert doc["error"]["code"] == "bad_policy" and doc["error"]["fix"]
    doc, proc = run_json("screen", "--baseline", "x.gguf")  # an argparse usage error
    assert proc.returncode == 2 and doc["error"]["code"] == "usage" and "--candidate" in doc["error"]["message"]


def test_score_csv_self_test_and_cells(tmp_path: Path) -> None:
    doc, _ = run_json("score-csv", "--self-test")
    assert doc["result"]["n_cases"] == 7 and doc["result"]["n_failed"] == 0
    src = tmp_path / "cells.csv"
    src.write_text(HEADER + "\nllama__fp16,true,0.9,0.1,0.2,30,90,100\n"
                   "llama__gptq,false,0.565,0.505,0.519,97.89,31,100\n"
                   "jbb__a,true,0,0,0,0,0,100\njbb__b,false,0,0,0,0,0,100\n")
    doc, proc = run_json("score-csv", "--input", str(src))
    assert proc.returncode == 3  # one cell has insufficient data: the same exit code as without --json
    cells = {c["cell_id"]: c for c in doc["result"]["cells"]}
    assert cells["llama__gptq"]["band"] == "HIGH" and cells["jbb__b"]["status"] == "insufficient_data"


def test_calibrate(rtsi_table: Path, tmp_path: Path) -> None:
    doc, _ = run_json("calibrate", "--input", str(rtsi_table), "--output", str(tmp_path / "mine.yaml"))
    assert doc["result"]["loocv"]["recall"] == "10/10" and doc["result"]["name"] == "mine"
    assert (tmp_path / "mine.yaml").is_file()


def test_screen_manifest(tmp_path: Path) -> None:
    side = lambda q, f: {"repo_id": f"org/m-{q}", "revision": "c" * 40, "quantization": q, "features": f}
    base = {"n_refusals": 79, "dominant_prefix_share": 1.0, "unique_prefix_rate": 1 / 79,
            "prefix_entropy_norm": 0.0, "mean_tokens_refusal": 40.0}
    cand = {"n_refusals": 0, "dominant_prefix_share": 0, "unique_prefix_rate": 0, "prefix_entropy_norm": 0,
            "mean_tokens_refusal": 0}
    req = {"schema_version": "quantsafe.external-screen.v1", "measurement_protocol": "quantsafe.refusal-features.v1",
           "source_model_id": "org/m", "probe_set": {"count": 100, "sha256": "1" * 64},
           "baseline": side("FP16", base), "candidate": side("GPTQ", cand)}
    (tmp_path / "req.json").write_text(json.dumps(req))
    doc, _ = run_json("screen-manifest", str(tmp_path / "req.json"))
    assert doc["result"]["classification"] == "HIGH" and "refusal_collapse" in doc["result"]["flags"]


def test_card_attest_and_verify(tmp_path: Path, smollm2_gguf: Path) -> None:
    from test_attest import make_record  # the real screening record the signing tests use

    record = tmp_path / "record.json"
    record.write_text(json.dumps(make_record(smollm2_gguf, "high")))
    doc, _ = run_json("card", str(record))
    assert doc["result"]["card"]["score"]["classification"] == "HIGH" and "HIGH" in doc["result"]["yaml"]
    key = tmp_path / "k.pem"
    subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", "keygen", "--out", str(key)], check=True,
                   cwd=REPO, capture_output=True)
    out = tmp_path / "r.dsse.json"
    doc, _ = run_json("attest", str(record), "--artifact", str(smollm2_gguf), "--key", str(key), "--out", str(out))
    assert doc["result"]["output"] == str(out) and doc["result"]["signed"] is True
    doc, _ = run_json("verify", str(out), "--artifact", str(smollm2_gguf), "--key", str(key.with_suffix(".pub.pem")))
    assert doc["result"]["band"] == "HIGH" and doc["result"]["limits"] == LIMITS_SENTENCE
    doc, proc = run_json("verify", str(out), "--artifact", str(record), "--key", str(key.with_suffix(".pub.pem")))
    assert proc.returncode == 4 and doc["error"]["code"] == "verification_failed"


@pytest.mark.slow
def test_screen_json_on_a_real_model(tmp_path: Path, smollm2_ladder: dict[str, Path]) -> None:
    """A real screening (SmolLM2 F16 against its Q2_K rung, 6 probes, the machine cache)."""
    from pytest_quantsafe.engines.cache import default_root

    doc, proc = run_json("screen", "--baseline", str(smollm2_ladder["F16"]), "--candidate", str(smollm2_ladder["Q2_K"]),
                         "--max-probes", "6", "--policy", "advisory", "--out", str(tmp_path / "out"), "--threads", "1",
                         "--no-progress", "--cache-dir", str(default_root()), timeout=900)
    [cand] = doc["result"]["candidates"]
    record = json.loads(Path(cand["record"]).read_text())
    assert cand["rtsi"] == record["screening"]["rtsi"] and cand["band"] == record["screening"]["band"]
    assert proc.returncode == record["verdict"]["exit_code"] == cand["verdict"]["exit_code"]
