"""The GPTQ/AWQ zoo recipe and what the hf engine reads from a quantized config (no model loaded).

The slow end-to-end screenings of real gptqmodel checkpoints are in test_gptq_awq_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_quantsafe import zoo
from pytest_quantsafe.engines.hf_quant import load_failure, missing_packages, quantization_details
from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.probes import load_probes
from pytest_quantsafe.types import Artifact, normalize_text
from pytest_quantsafe.zoo import quantizer

#: quantization_config as gptqmodel 7.6.0 wrote it for SmolLM2-135M (meta trimmed to what is read).
GPTQ_CONFIG = {"bits": 4, "checkpoint_format": "gptq", "desc_act": False, "format": "gptq", "group_size": 64,
               "lm_head": False, "meta": {"quantizer": ["gptqmodel:7.6.0"]}, "method": "gptq",
               "pack_dtype": "int32", "quant_method": "gptq", "sym": True}


def test_the_recipes_are_fixed_4_bit_group_64() -> None:
    assert zoo.HF_QUANTS == ("GPTQ-W4", "AWQ-W4")
    gptq, awq = quantizer.RECIPES["GPTQ-W4"], quantizer.RECIPES["AWQ-W4"]
    assert (gptq.method, gptq.format, gptq.bits, gptq.group_size, gptq.sym, gptq.desc_act) == \
        ("gptq", "gptq", 4, 64, True, False)
    assert (awq.method, awq.format, awq.bits, awq.group_size, awq.sym) == ("awq", "gemm", 4, 64, False)
    # 576 (SmolLM2) and 896 (Qwen2.5 0.5B) hidden sizes are both whole numbers of groups
    assert 576 % gptq.group_size == 0 and 896 % gptq.group_size == 0
    # torch goes in first and exact, so pip never pulls another torch build into the venv
    assert quantizer.QUANTIZER_REQUIREMENTS[0].startswith("torch==")


def test_calibration_is_our_benign_data_never_a_probe() -> None:
    rows = quantizer.calibration_rows()
    assert len(rows) == 150
    assert all(row["id"].startswith("rb-") for row in rows)
    probes = {normalize_text(p.prompt) for p in load_probes().items}
    assert not probes & {normalize_text(row["prompt"]) for row in rows}


def _fake_checkpoint(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_the_cache_key_follows_the_source_weights_and_the_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("QUANTSAFE_CACHE", str(tmp_path / "cache"))
    one = _fake_checkpoint(tmp_path / "one", b"weights one")
    two = _fake_checkpoint(tmp_path / "two", b"weights two")
    gptq_one = quantizer.variant_path(one, "GPTQ-W4", "src")
    assert gptq_one == quantizer.variant_path(one, "GPTQ-W4", "src")
    assert gptq_one.parent == tmp_path / "cache" / "hf" and gptq_one.name.startswith("src-gptq-w4-")
    assert quantizer.variant_path(two, "GPTQ-W4", "src") != gptq_one
    assert quantizer.variant_path(one, "AWQ-W4", "src").name.startswith("src-awq-w4-")
    with pytest.raises(ModelLoadError, match="unknown quantizer variant"):
        quantizer.variant_path(one, "GPTQ-W3", "src")
    with pytest.raises(ModelLoadError, match="not a transformers checkpoint"):
        quantizer.variant_path(tmp_path, "GPTQ-W4", "src")


def test_details_name_the_real_format() -> None:
    assert quantization_details({}) == {}
    assert quantization_details({"quantization_config": GPTQ_CONFIG}) == {
        "quant_method": "gptq", "quant_bits": "4", "quant_group_size": "64", "quant_format": "gptq",
        "quant_sym": "true", "quant_desc_act": "false", "quantizer": "gptqmodel:7.6.0"}
    awq = quantization_details({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                        "version": "gemm", "zero_point": True}})
    assert awq == {"quant_method": "awq", "quant_bits": "4", "quant_group_size": "128", "quant_format": "gemm",
                   "quant_sym": "false"}
    compressed = quantization_details({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 64, "symmetric": True}}}}})
    assert compressed == {"quant_method": "compressed-tensors", "quant_bits": "4", "quant_group_size": "64",
                          "quant_format": "pack-quantized", "quant_sym": "true"}


def test_a_load_failure_names_format_device_and_kernel_packages() -> None:
    meta = quantization_details({"quantization_config": {**GPTQ_CONFIG, "checkpoint_format": "marlin"}})
    artifact = Artifact(ref="/models/x", format="hf", files=(), quantization="gptq-w4", name="x", metadata=meta)
    error = load_failure(artifact, "cpu", ValueError("No valid quant linear\nsecond line"))
    assert error.exit_code == 2 and error.where == "/models/x"
    assert "gptq-w4 checkpoint (format marlin, bits 4, group size 64) on cpu" in error.message
    assert "gptqmodel" in error.message and "optimum" in error.message
    assert error.message.endswith("ValueError: No valid quant linear")
    assert missing_packages("eetq") == ["eetq"]
    assert missing_packages(None) == []
