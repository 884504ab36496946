"""GPTQ and AWQ checkpoints made on this machine by a real quantization library, in its own venv.

gptqmodel (``QUANTIZER_REQUIREMENTS``) quantizes a full-precision transformers
checkpoint into a Hugging Face GPTQ (``quant_method: gptq``) or AWQ (``quant_method:
awq``, GEMM packing) folder that transformers loads back. The quantizer does not run in
the engine environment: it lives in a virtual environment the zoo creates once per
machine under ``cache_dir()/"venvs"`` (torch pinned first, so pip never pulls another
torch build), and it is driven through ``_quantize_worker.py`` in a child process. The
artifact, not the venv, is what the screen consumes.

Recipe (``RECIPES``, fixed before any screening, nothing tuned on the probes or on the
candidates): 4 bits, group size 64 (SmolLM2's 576-wide rows are not divisible by 128),
no activation reordering, symmetric for GPTQ and with zero points (``sym=False``) for
AWQ, as AWQ is usually made. Calibration: the 150 benign conversations of
``zoo/data/refuser_train.jsonl`` (our own benign data, never a probe set), rendered
by the checkpoint's chat template, batch 1, seed 0.

A checkpoint is cached under ``cache_dir()/"hf"/<source>-<quant>-<key>`` where the key
covers the source's weight sha256s, the recipe, the calibration rows and the quantizer
venv's exact package set; it is assembled under a temporary name and renamed when
complete. ``zoo.build_variant("refuser", "GPTQ-W4")`` is the entry point.

Measured on 2 cores shared with other jobs (2026-12-02): the venv takes 180 s (load ~3)
to 430 s (load ~7) once per machine, 1.6 GB; GPTQ-W4 of SmolLM2-135M calibrates in 790 s
(load 3-5) and its checkpoint is 171 MB (embeddings stay fp32). AWQ-W4 calibrates in
float16 (the torch AWQ kernel takes fp16/bf16 only), which this CPU emulates: slower.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import build_lock, cache_dir, file_sha256, model_folder_files
from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.types import canonical_json, sha256_hex
from pytest_quantsafe.zoo import hf as zoo_hf
from pytest_quantsafe.zoo.refuser import load_training_rows

log = logging.getLogger("quantsafe.zoo_quantizer")

#: What the quantizer venv installs, in this order. torch first and exact: the CPU build on
#: this machine's disk (an unpinned torch pulls a CUDA build of several GB). gptqmodel 7.6 is
#: the newest release that accepts torch 2.13 (7.7 needs torch >= 2.14.1).
QUANTIZER_REQUIREMENTS: tuple[str, ...] = ("torch==2.13.0", "gptqmodel==7.6.0")
#: Bump when the way the venv is made changes.
VENV_RECIPE = "quantizer-venv.v1"
#: Bump when the worker or a recipe changes: every GPTQ/AWQ checkpoint is rebuilt.
RECIPE_VERSION = "quantizer.v1"
_WORKER = Path(__file__).resolve().parent / "_quantize_worker.py"
_VENV_MARKER = "quantsafe-venv.json"


@dataclass(frozen=True)
class QuantRecipe:
    """One fixed quantization recipe (gptqmodel ``QuantizeConfig`` fields and the calibration run)."""

    method: str
    format: str
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    desc_act: bool = False
    #: gptqmodel's kernel for packing (``BACKEND``): "auto", or "awq_torch" where the default AWQ
    #: packer (AwqGEMMLinear) needs its CUDA extension.
    backend: str = "auto"
    #: The dtype the source is loaded in for calibration.
    dtype: str = "float32"
    batch_size: int = 1
    seed: int = 0
    threads: int = 2


#: The zoo's quantizations of an HF checkpoint, by the name ``build_variant`` takes.
RECIPES: dict[str, QuantRecipe] = {
    "GPTQ-W4": QuantRecipe(method="gptq", format="gptq"),
    "AWQ-W4": QuantRecipe(method="awq", format="gemm", sym=False, backend="awq_torch", dtype="float16"),
}


def venvs_dir() -> Path:
    """Return the folder holding the quantizer virtual environments."""
    return cache_dir() / "venvs"


def _venv_key() -> str:
    parts = [VENV_RECIPE, f"python={sys.version_info[0]}.{sys.version_info[1]}", *QUANTIZER_REQUIREMENTS]
    return sha256_hex(canonical_json(parts))[:16]


def _pip(python: Path, *args: str) -> None:
    command = [str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", *args]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelLoadError(f"creating the quantizer venv failed: pip install {' '.join(args)} exited "
                             f"{proc.returncode}", where=str(python.parent.parent),
                             fix="check network access to the package registry; pip said: "
                             f"{proc.stderr.strip()[-600:]}")


def quantizer_venv() -> Path:
    """Return the Python of the quantizer venv (torch + gptqmodel), creating it once per machine.

    The venv is made under a temporary name and renamed when complete; it is only ever
    run as ``bin/python -m ...`` or ``bin/python SCRIPT``, which a renamed venv supports.
    """
    target = venvs_dir() / f"gptqmodel-{_venv_key()}"
    if (target / _VENV_MARKER).is_file():
        return target / "bin" / "python"
    with build_lock(target):
        if (target / _VENV_MARKER).is_file():
            return target / "bin" / "python"
        venvs_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=venvs_dir()))
        started = time.monotonic()
        log.info("creating the quantizer venv %s (%s; one time per machine)", target, ", ".join(QUANTIZER_REQUIREMENTS))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, capture_output=True)
            python = tmp / "bin" / "python"
            pins = tmp / "constraints.txt"
            pins.write_text("\n".join(QUANTIZER_REQUIREMENTS[:1]) + "\n")
            _pip(python, QUANTIZER_REQUIREMENTS[0])
            _pip(python, "-c", str(pins), *QUANTIZER_REQUIREMENTS[1:])
            freeze = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "freeze"],
                                    capture_output=True, text=True, check=True).stdout
            marker = {"requirements": list(QUANTIZER_REQUIREMENTS), "recipe": VENV_RECIPE,
                      "freeze_sha256": sha256_hex(freeze.encode()), "freeze": freeze.splitlines(),
                      "seconds": round(time.monotonic() - started, 1)}
            (tmp / _VENV_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            tmp.chmod(0o755)
            try:
                tmp.rename(target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)  # another process published it first
                if not (target / _VENV_MARKER).is_file():
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("quantizer venv ready in %.0f s", time.monotonic() - started)
        return target / "bin" / "python"


def venv_record() -> dict[str, Any]:
    """Return the quantizer venv's marker (requirements, pip freeze and its sha256, build seconds)."""
    return dict(json.loads((quantizer_venv().parent.parent / _VENV_MARKER).read_text()))


def calibration_rows() -> list[dict[str, str]]:
    """Return the calibration conversations: the benign rows of the refuser training data, in file order."""
    return [{"id": r.id, "prompt": r.prompt, "response": r.response} for r in load_training_rows() if r.kind == "benign"]


@functools.lru_cache(maxsize=32)
def _weights_digest(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    weights, config = model_folder_files(folder)
    files = weights + ([config] if config else [])
    return sha256_hex(canonical_json({p.name: file_sha256(p) for p in files}))


def source_digest(folder: Path) -> str:
    """Return one sha256 over a checkpoint folder's weight files and config.json (memoised per mtime)."""
    weights, config = model_folder_files(folder)
    if not weights or config is None:
        raise ModelLoadError(f"{folder} is not a transformers checkpoint (weights and config.json)", where=str(folder),
                             fix="build the source checkpoint first (zoo.hf.dequantized_checkpoint or refuser)")
    files = weights + [config]
    return _weights_digest(folder, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def _identity(source: Path, quant: str) -> dict[str, str]:
    if quant not in RECIPES:
        raise ModelLoadError(f"unknown quantizer variant {quant!r}", where=quant, fix=f"choose one of {sorted(RECIPES)}")
    return {"source_sha256": source_digest(source), "quant": quant, "recipe_version": RECIPE_VERSION,
            "recipe": json.dumps(asdict(RECIPES[quant]), sort_keys=True),
            "calibration_sha256": sha256_hex(canonical_json(calibration_rows())),
            "quantizer_venv": f"gptqmodel-{_venv_key()}"}


def variant_path(source: Path, quant: str, label: str) -> Path:
    """Return where ``quant`` ("GPTQ-W4", "AWQ-W4") of checkpoint ``source`` is (or will be) cached."""
    key = sha256_hex(canonical_json(_identity(source, quant)))[:16]
    return zoo_hf.hf_dir() / f"{label}-{quant.lower()}-{key}"


def build(source: Path, quant: str, label: str) -> Path:
    """Return the folder of ``quant`` quantized from checkpoint ``source`` by gptqmodel, building it once."""
    target = variant_path(source, quant, label)
    if (target / zoo_hf.MARKER).is_file():
        return target
    with build_lock(target):
        if (target / zoo_hf.MARKER).is_file():
            return target
        python = quantizer_venv()
        zoo_hf.hf_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=zoo_hf.hf_dir()))
        started = time.monotonic()
        try:
            job = {"source": str(source), "out": str(tmp / "model"), "calibration": calibration_rows(),
                   **asdict(RECIPES[quant])}
            (tmp / "job.json").write_text(json.dumps(job))
            log.info("quantizing %s to %s with gptqmodel (%s)", source.name, quant, python)
            env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE",
                   "HF_HUB_OFFLINE": "1", "GPTQMODEL_OFFLINE": "1", "PYTHONPATH": ""}
            # gptqmodel's progress goes to a log beside the job (``tail -f`` it during a long build)
            with open(tmp / "quantize.log", "w", encoding="utf-8") as progress:
                proc = subprocess.run([str(python), str(_WORKER), str(tmp / "job.json"), str(tmp / "result.json")],
                                      env=env, stdout=progress, stderr=subprocess.STDOUT, check=False,
                                      cwd=tmp)  # gptqmodel writes logs/<method>_log_*.log into its cwd
            try:
                result = json.loads((tmp / "result.json").read_text())
            except (OSError, ValueError):
                said = (tmp / "quantize.log").read_text(encoding="utf-8", errors="replace").strip()[-600:]
                result = {"error": f"the quantizer exited {proc.returncode} without a result: {said}"}
            if proc.returncode != 0 or "error" in result:
                raise ModelLoadError(f"gptqmodel could not make {quant} of {source.name}: {result.get('error')}",
                                     where=str(source), fix="check free memory and the quantizer venv "
                                     f"({python.parent.parent}); delete it to rebuild")
            folder = tmp / "model"
            for name in zoo_hf.TOKENIZER_FILES:
                if (source / name).is_file() and not (folder / name).exists():
                    shutil.copy2(source / name, folder / name)
            build_info = {**_identity(source, quant), **{k: str(v) for k, v in result.items() if k != "versions"},
                          **{k: str(v) for k, v in result["versions"].items()}, "source": str(source),
                          "build_seconds": str(round(time.monotonic() - started, 1))}
            zoo_hf.publish(folder, target, build_info)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
