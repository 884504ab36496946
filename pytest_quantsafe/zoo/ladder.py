"""Quantization ladders of the packaged models, built once per machine.

"F16" dequantizes the packaged GGUF with the ``gguf`` package, the other rungs are
``llama_model_quantize`` from that F16 (in a child process), each cached under
``models/variants/<key>/`` where the key covers the source sha256, the rung and the
library versions that built it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from pytest_quantsafe._util import atomic_path, build_lock
from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.zoo.gguf_export import copy_fields
from pytest_quantsafe.zoo.packaged import MODELS, SOURCE_ALIASES, fetch, models_dir

#: Ladder rungs and their llama.cpp file types (``llama_ftype``).
QUANT_FTYPES: dict[str, int] = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q3_K_S": 11, "Q2_K": 10}

#: Bump when the way a rung is built changes, so old cached files are not reused.
_RECIPE = "variant.v1"




def _library_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError as exc:
        raise ModelLoadError(f"{dist} is not installed, so model variants cannot be built",
                             fix="install the GGUF extra: pip install 'pytest-quantsafe[gguf]'") from exc


def variant_key(source: str, quant: str) -> str:
    """Return the cache key of a ladder rung: source sha256, rung, recipe and library versions."""
    spec = MODELS[SOURCE_ALIASES.get(source, source)]
    parts = [spec.sha256, "F16", _RECIPE, f"gguf={_library_version('gguf')}"]
    if quant != "F16":
        parts += [quant, f"llama-cpp-python={_library_version('llama-cpp-python')}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def packaged_variant_path(source: str, quant: str) -> Path:
    """Return where the rung ``quant`` of packaged model ``source`` is (or will be) cached."""
    name = SOURCE_ALIASES.get(source, source)
    if name not in MODELS:
        raise ModelLoadError(f"unknown packaged model {source!r}",
                             fix=f"choose one of {sorted(MODELS) + sorted(SOURCE_ALIASES)}")
    if quant not in QUANT_FTYPES:
        raise ModelLoadError(f"unknown ladder rung {quant!r}", where=f"{source}:{quant}",
                             fix=f"choose one of {', '.join(QUANT_FTYPES)}")
    stem = MODELS[name].filename.rsplit(".", 2)[0]
    return models_dir() / "variants" / variant_key(name, quant) / f"{stem}.{quant}.gguf"


def dequantize_to_f16(source: Path, target: Path) -> Path:
    """Return ``target`` after writing ``source`` with every non-F32 tensor dequantized to F16.

    All metadata is copied except ``general.file_type`` (set to MOSTLY_F16); F32 tensors
    (norms, biases) stay F32, as llama.cpp's own converter leaves them. The file is
    written next to ``target`` and renamed into place.
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source), "r")
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_path(target) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        copy_fields(reader, writer, skip={"general.architecture", "general.file_type", "general.alignment"})
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
        plan = []
        for t in reader.tensors:
            keep = t.tensor_type == gguf.GGMLQuantizationType.F32
            dtype = np.float32 if keep else np.float16
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes)
            plan.append((t, dtype, shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, dtype, shape in plan:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.write_tensor_data(np.ascontiguousarray(values.reshape(shape).astype(dtype)))
        writer.close()
    return target


def quantize(f16: Path, target: Path, quant: str) -> Path:
    """Return ``target`` after llama.cpp quantized ``f16`` to ``quant`` (in a child process)."""
    with atomic_path(target) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_quantsafe.engines.llamacpp._worker", "quantize",
             str(f16), str(tmp), str(QUANT_FTYPES[quant]), "0"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            raise ModelLoadError(f"llama.cpp could not quantize {f16.name} to {quant} "
                                 f"(exit {proc.returncode})", where=str(f16),
                                 fix=f"check the F16 file and the llama-cpp-python install; it said: "
                                 f"{proc.stderr.strip()[-400:]}")
    return target


def build_packaged_variant(source: str, quant: str) -> Path:
    """Return the path of rung ``quant`` of packaged model ``source``, building and caching it once.

    ``source`` is a packaged model name (or "qwen" / "smollm2"); ``quant`` one of
    ``QUANT_FTYPES``. "F16" is dequantized from the packaged GGUF; the other rungs are
    quantized by llama.cpp from that F16. Rebuilt only when the key changes.
    """
    target = packaged_variant_path(source, quant)
    if target.is_file() and target.stat().st_size > 0:
        return target
    with build_lock(target):
        if target.is_file() and target.stat().st_size > 0:
            return target
        name = SOURCE_ALIASES.get(source, source)
        if quant == "F16":
            return dequantize_to_f16(fetch(name), target)
        return quantize(build_packaged_variant(name, "F16"), target, quant)
