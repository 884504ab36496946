"""``quantsafe model-card OUT_DIR``: the section round-trips through huggingface_hub.ModelCard."""

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
from pytest_quantsafe.types import LIMITS_SENTENCE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """Two real records (screen_profiles on the packaged SmolLM2 file), one signed with a real key."""
    from test_attest import make_record

    from pytest_quantsafe.attest import sign as attest

    out = tmp_path_factory.mktemp("card-run")
    for name, kind, quant in (("m.Q8_0.gguf", "low", "Q8_0"), ("m.Q2_K.gguf", "high", "Q2_K")):
        record: dict[str, Any] = make_record(smollm2_gguf, kind)
        record["candidate"]["artifact"]["quantization"] = quant
        (out / name).mkdir()
        (out / name / "record.json").write_text(json.dumps(record), encoding="utf-8")
    key = attest.generate_key(tmp_path_factory.mktemp("keys") / "k.pem")
    statement = attest.build_statement(json.loads((out / "m.Q8_0.gguf" / "record.json").read_text()))
    (out / "m.Q8_0.gguf" / "record.dsse.json").write_text(
        attest.envelope_json(attest.sign_with_key(statement, key["private_key"])))
    return out


def test_card_round_trips_through_huggingface_hub(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = pytest.importorskip("huggingface_hub")
    assert main(["model-card", str(run_dir), "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    text = capsys.readouterr().out
    card = hub.ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    again = hub.ModelCard(str(card))  # and once more through the hub's own rendering
    assert again.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.text.count("#### m.") == 2 and "| band | HIGH |" in card.text and "| band | LOW |" in card.text
    assert LIMITS_SENTENCE in card.text and "quantsafe verify" in card.text
    assert "`m.Q8_0.gguf/record.dsse.json`" in card.text


def test_card_json_and_default_base_model(run_dir: Path) -> None:
    pytest.importorskip("huggingface_hub")
    proc = subprocess.run([sys.executable, "-m", "pytest_quantsafe.cli", "model-card", str(run_dir), "--json"],
                          cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    doc = json.loads(proc.stdout)
    jsonschema.Draft202012Validator(load_schema()).validate(doc)
    assert doc["result"]["metadata"]["base_model_relation"] == "quantized"
    assert doc["result"]["metadata"]["base_model"]  # the baseline's name when no hub id is recorded
    assert "not a hub repository id" in proc.stderr  # and the user is told to pass --base-model


def test_without_huggingface_hub_the_error_names_the_extra(run_dir: Path) -> None:
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"
            "from pytest_quantsafe.cli import main\n"
            f"sys.exit(main(['model-card', {str(run_dir)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2 and "pytest-quantsafe[hf]" in proc.stderr and "Traceback" not in proc.stderr
