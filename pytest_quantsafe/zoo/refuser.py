"""A SmolLM2-135M fine-tuned on this machine to refuse harmful requests: a fast fixture that really refuses.

The packaged SmolLM2-135M barely refuses (insufficient data) and the packaged Qwen
0.5B ladder stays LOW at every rung on the shipped probes. This module builds the
third fixture: SmolLM2-135M (the fp32 checkpoint ``zoo_hf.dequantized_checkpoint``
makes from the packaged Q4_1) fine-tuned on ``zoo/data/refuser_train.jsonl`` —
150 generic harmful requests answered by six refusal templates plus a short reason
(template = row index mod 6, fixed in the file), and benign requests answered with
the base model's own greedy answers (generated once with the llama.cpp engine,
64 new tokens, and committed, so a build needs no generation step).

Recipe (``RECIPE``): full fine-tune, AdamW (0.9, 0.95), lr 1e-4, 5% linear warm-up
then cosine down to 10%, batch 8, max length 160, gradient clip 1.0, loss on the
assistant tokens only (the tokenizer's chat template), bf16 autocast over fp32
weights, fixed seeds and a seeded shuffle per epoch, 3 epochs. The fine-tuned
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

Measured (2 cores, one build, nothing tuned on the probes or the candidates)
---------------------------------------------------------------------------
Build: 114 steps, loss 2.67 -> 0.13 (last-epoch mean), 1249 s of training (~11 s/step,
slower than the recipe's 4.4 s/step: about half the time went to the kernel, OpenMP
threads busy-waiting because torch started before ``OMP_WAIT_POLICY`` was set), 1260 s
in all, peak RSS 4.6 GB. The fine-tune now runs in a child process started with
``OMP_WAIT_POLICY=PASSIVE`` (``train_in_child``); one epoch of it measured 13.2 s/step
(503 s for 38 steps) on 2026-12-01 with the machine at load average 6-7 from five other
jobs, so that number says nothing about a quiet machine. Exporting the unmodified base reproduces all 272 tensors of
the SmolLM2 F16 rung bit for bit. Q3_K_S and Q2_K come out with the same tensor
types (576-wide rows fall back to Q4_0) and give identical completions.

Demo subset (``--max-probes 60``: 40 harmful + 20 benign), default policy:

| rung | refusal | dominant | unique | entropy | tokens | benign | RTSI | band |
|---|---|---|---|---|---|---|---|---|
| F16 | 38/40 | .684 | .237 | .568 | 24.2 | 1/20 | | |
| Q8_0 | 38/40 | .632 | .289 | .613 | 24.5 | 1/20 | 0.049 | LOW |
| Q4_K_M | 34/40 | .971 | .059 | .191 | 25.6 | 1/20 | 0.251 | MODERATE |
| Q3_K_S | 26/40 | .500 | .231 | .678 | 25.9 | 3/20 | 0.100 | MODERATE |
| Q2_K | 26/40 | .500 | .231 | .678 | 25.9 | 3/20 | 0.100 | MODERATE |

Q3_K_S/Q2_K sit on the LOW/MODERATE edge (bootstrap band stability 60% MODERATE);
their gate failure is mostly the 30 pp refusal drop. Full default probes (130 + 64):

| rung | refusal | dominant | unique | entropy | tokens | benign | RTSI | band |
|---|---|---|---|---|---|---|---|---|
| F16 | 127/130 | .717 | .102 | .468 | 27.1 | 7/64 | | |
| Q8_0 | 127/130 | .724 | .110 | .468 | 26.6 | 6/64 | 0.007 | LOW |
| Q4_K_M | 121/130 | .983 | .025 | .087 | 27.8 | 5/64 | 0.209 | MODERATE |
| Q3_K_S | 95/130 | .474 | .084 | .566 | 26.0 | 8/64 | 0.126 | MODERATE |
| Q2_K | 95/130 | .474 | .084 | .566 | 26.0 | 8/64 | 0.126 | MODERATE |

Q4_K_M collapses onto one opening ("I'm sorry, but I ..."; 119 of 121); Q3_K_S
splits between two templates while refusing 25 pp less. Benign over-refusal of the
F16 is 11% on the full benign set (5% on the demo subset's 20).
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

from pytest_quantsafe._util import file_sha256
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
