"""A SmolLM2-135M fine-tuned on this machine to refuse harmful requests: a fast fixture that really refuses.

The packaged SmolLM2-135M barely refuses (insufficient data) and the packaged Qwen
0.5B ladder stays LOW at every rung on the shipped probes. This module builds the
third fixture: SmolLM2-135M (the fp32 checkpoint ``zoo_hf.dequantized_checkpoint``
makes from the packaged Q4_1) fine-tuned on ``zoo/data/refuser_train.jsonl`` —
150 generic harmful requests answered by six refusal templates plus a short reason
(template = row index mod 6, fixed in the file), and benign requests answered with
the base model's own greedy answers (generated once with the llama.cpp engine,
64 new tokens, and committed, so a build needs no generation step).

Recipe (``zoo/finetune.py``, ``RECIPE``, ``refuser.v2``): the top 12 of the 30 decoder
layers trained (the lower 18 and the tied embeddings frozen, so the backward pass stops
above them), fp32 (bf16 autocast is emulated, several times slower, on an AVX2 CPU),
AdamW (0.9, 0.95), lr 2e-4, 5% linear warm-up then cosine down to 10%, batch 8, rows
sorted by length inside windows of 32 after each epoch's seeded shuffle, max length 160,
gradient clip 1.0, loss on the assistant tokens only (only those positions are projected
onto the vocabulary), fixed seeds, 2 epochs (76 steps). ``QUANTSAFE_REFUSER_RECIPE=smoke``
runs 3 steps of it instead (a cold-path check, keyed apart). The fine-tuned
weights are written to a GGUF F16 by ``export_gguf`` (our own writer over the
``gguf`` package): metadata, tokenizer, tensor order, shapes and types come from the
packaged SmolLM2 F16 rung, the llama Q/K row permutation that transformers undoes
on load is re-applied, and ``general.name`` says what the file is. The other rungs
are quantized from that F16 by ``zoo._quantize`` (``zoo.build_variant("refuser", Q)``).

The F16 file, the fine-tuned HF checkpoint and a build record live in one folder
under ``zoo.cache_dir()/"models"/"variants"/<key>`` where the key covers the training
data's sha256, ``RECIPE_VERSION``, the base model's sha256 and the torch,
transformers and gguf versions; the folder is assembled under a temporary name and
renamed when complete, so an interrupted build leaves nothing that looks finished.

Usage: ``python -m pytest_quantsafe.zoo build --source refuser --quant F16``.

Measured (2 cores AMD EPYC Zen3, AVX2, 2026-12-02; one build, nothing tuned on the probes or the candidates)
-----------------------------------------------------------------------------------------------------
Build (``python -m pytest_quantsafe.zoo build --source refuser --quant F16`` under
``/usr/bin/time``): 76 steps, loss 2.67 -> 0.19 (last step), **628 CPU-seconds** in all
(594 user + 34 system; the F16 template and the export included), peak RSS 2.4 GB. The
machine was at load average 6-8 from other jobs, so the wall time was 23 min 21 s; on two
otherwise idle cores the CPU time bounds it at about 5.2 minutes. Per step, the same
batch of 8 rows (~106 tokens wide) cost 19 CPU-s with every layer trained in fp32, and
10.5 CPU-s with 15 layers and the embeddings frozen (v2 freezes 18); bf16 autocast was slower still here. v1 (all layers,
bf16, 3 epochs, 114 steps) took 21 minutes. Exporting the unmodified base reproduces all
272 tensors of the SmolLM2 F16 rung bit for bit.

Demo subset (``quantsafe demo --ladder refuser``: 40 harmful + 20 benign), default policy:

| rung | refusal | dominant | unique | entropy | tokens | benign refused | RTSI | band |
|---|---|---|---|---|---|---|---|---|
| F16 | 38/40 | .526 | .053 | .998 | 25.0 | 3/20 | | |
| Q8_0 | 38/40 | .605 | .053 | .968 | 26.0 | 3/20 | 0.039 | LOW |
| Q4_K_M | 35/40 | .971 | .057 | .187 | 25.9 | 3/20 | 0.337 | MODERATE |
| Q3_K_S | 37/40 | .784 | .162 | .472 | 35.6 | 5/20 | 0.257 | MODERATE |

The F16 splits its refusals between two openings; Q4_K_M collapses onto one, Q3_K_S
leans onto one and its refusals grow longer, while its refusal rate barely moves
(95% -> 92%, 2 of 38 refusals lost): drift in the shape of the refusals, not in their
number, which is what RTSI is for. Q8_0 loses none (at most 9.2% at 95%).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import build_lock, file_sha256
from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.zoo import hf as zoo_hf
from pytest_quantsafe.zoo.finetune import (  # noqa: F401  # re-exported: the fixture's training API
    DATA_FILE,
    RECIPE,
    RECIPE_ENV,
    RECIPES,
    Recipe,
    TrainingRow,
    active_recipe,
    answer_loss,
    encode_rows,
    epoch_order,
    fine_tune,
    freeze,
    load_training_rows,
    lr_factor,
    train_in_child,
)
from pytest_quantsafe.zoo.gguf_export import export_gguf
from pytest_quantsafe.zoo.ladder import QUANT_FTYPES, build_packaged_variant
from pytest_quantsafe.zoo.packaged import MODELS, models_dir

log = logging.getLogger("quantsafe.zoo_refuser")

#: Bump when the data format, the training loop or the export changes: the fixture is rebuilt.
RECIPE_VERSION = "refuser.v2"
#: The packaged model the fixture is fine-tuned from.
BASE_MODEL = "smollm2-135m-q4_1"
#: ``general.name`` of the exported GGUF.
GENERAL_NAME = "SmolLM2-135M-Instruct quantsafe refusal-tuned test fixture (not a safety model)"
#: File stem of every rung.
STEM = "SmolLM2-135M-Instruct-quantsafe-refuser"
#: Written last into a complete build folder.
MARKER = "quantsafe-build.json"
_HF_SUBDIR = "hf-checkpoint"


def build_identity(data_file: Path = DATA_FILE) -> dict[str, str]:
    """Return what the F16 fixture depends on: data sha256, recipe version, base sha256, library versions."""
    return {"data_sha256": file_sha256(data_file), "recipe_version": RECIPE_VERSION,
            "recipe": json.dumps(asdict(active_recipe()[1]), sort_keys=True), "base_sha256": MODELS[BASE_MODEL].sha256,
            **{package: zoo_hf.library_version(package) for package in ("torch", "transformers", "gguf")}}


def variant_key(quant: str = "F16") -> str:
    """Return the cache key of a rung of the fixture (the F16 identity, plus quant and llama.cpp for the others)."""
    parts = [f"{k}={v}" for k, v in sorted(build_identity().items())]
    if quant != "F16":
        parts += [quant, f"llama-cpp-python={zoo_hf.library_version('llama-cpp-python')}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def variant_path(quant: str) -> Path:
    """Return where rung ``quant`` of the refuser fixture is (or will be) cached."""
    if quant not in QUANT_FTYPES:
        raise ModelLoadError(f"unknown ladder rung {quant!r}", where=f"refuser:{quant}",
                             fix=f"choose one of {', '.join(QUANT_FTYPES)}")
    return models_dir() / "variants" / variant_key(quant) / f"{STEM}.{quant}.gguf"


def build_f16() -> Path:
    """Return the refuser fixture's GGUF F16, fine-tuning and exporting it once per key (cached)."""
    target = variant_path("F16")
    folder = target.parent
    if (folder / MARKER).is_file() and target.is_file():
        return target
    with build_lock(folder):
        if (folder / MARKER).is_file() and target.is_file():
            return target
        load_training_rows()  # bad training data fails here, naming file:line, before any build work
        base = zoo_hf.dequantized_checkpoint(BASE_MODEL)
        template = build_packaged_variant("smollm2", "F16")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            started = time.monotonic()
            recipe_name, recipe = active_recipe()
            training = train_in_child(base, tmp / _HF_SUBDIR, recipe)
            import torch
            from safetensors.torch import load_file

            state = load_file(str(tmp / _HF_SUBDIR / "model.safetensors"))
            export_gguf({k: v.to(torch.float32) for k, v in state.items()}, template, tmp / target.name,
                        general_name=GENERAL_NAME)
            build = {**build_identity(), **training, "build_seconds": round(time.monotonic() - started, 1),
                     "general_name": GENERAL_NAME, "recipe_name": recipe_name}
            (tmp / MARKER).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("refuser fixture built in %.0f s: %s", build["build_seconds"], target)
        return target


def hf_checkpoint() -> Path:
    """Return the fine-tuned transformers checkpoint folder that the F16 GGUF was exported from (building it once)."""
    return build_f16().parent / _HF_SUBDIR


def build_record() -> dict[str, Any]:
    """Return the build record (identity, steps, losses, seconds) of the cached F16 fixture, building it once."""
    return json.loads((build_f16().parent / MARKER).read_text())
