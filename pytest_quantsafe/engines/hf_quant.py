"""What a quantized transformers checkpoint is, and which kernel ran it (for the hf engine and the record).

``quantization_label`` names the format in a few characters (``gptq-w4``, ``awq-w4``,
``bnb-nf4``); ``quantization_details`` reads the fields of ``quantization_config`` that
say what the checkpoint holds (method, bits, group size, packing format, symmetry, the
library that wrote it) into artifact metadata; ``QUANT_PACKAGES`` is what transformers
needs installed to load each ``quant_method``; ``loaded_kernel`` names the modules and
packages the weights actually run on after loading (the record's ``engine.kernel``).
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from typing import Any

from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.types import Artifact

#: quant_method in config.json -> the (import name, pip name) pairs transformers needs to load it
#: (transformers 5.x loads AWQ through gptqmodel; GPTQ through optimum + gptqmodel).
QUANT_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"),),
    "quanto": (("optimum.quanto", "optimum-quanto"),),
    "torchao": (("torchao", "torchao"),),
    "hqq": (("hqq", "hqq"),),
    "eetq": (("eetq", "eetq"),),
    "higgs": (("flute", "flute-kernel"),),
    "vptq": (("vptq", "vptq"),),
    "aqlm": (("aqlm", "aqlm"),),
}
#: Top-level packages whose modules are the model's own layers, not a quantization kernel.
_DENSE_PACKAGES = frozenset({"torch", "transformers"})


def version_of(package: str) -> str:
    """Return the installed version of distribution ``package``, or "absent"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def importable(module: str) -> bool:
    """Return whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def missing_packages(method: str | None) -> list[str]:
    """Return the pip names of the packages ``quant_method`` needs that are not installed here."""
    return [pip for module, pip in QUANT_PACKAGES.get(method or "", ()) if not importable(module)]


def quantization_label(config: dict[str, Any]) -> str:
    """Return a short name of a checkpoint's quantization from its config.json (dtype when unquantized)."""
    q = config.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if not method:
        return str(config.get("torch_dtype") or config.get("dtype") or "unknown")
    if method == "bitsandbytes":
        if q.get("load_in_4bit") or q.get("_load_in_4bit"):
            return f"bnb-{q.get('bnb_4bit_quant_type', 'fp4')}"
        return "bnb-int8"
    if method in ("gptq", "awq"):
        return f"{method}-w{q.get('bits', '?')}"
    if method == "compressed-tensors":
        return f"compressed-tensors:{q.get('format', 'unknown')}"
    if method == "quanto":
        return f"quanto-{q.get('weights', '?')}"
    if method == "torchao":
        kind = q.get("quant_type")
        if isinstance(kind, dict):  # {"default": {"_type": "Int8WeightOnlyConfig", ...}}
            kind = (kind.get("default") or {}).get("_type", "unknown") if isinstance(kind.get("default"), dict) \
                else kind.get("_type", "unknown")
        return f"torchao:{kind}"
    return method


def _compressed_tensors_weights(q: dict[str, Any]) -> dict[str, Any]:
    groups = q.get("config_groups")
    if isinstance(groups, dict):
        for group in groups.values():
            if isinstance(group, dict) and isinstance(group.get("weights"), dict):
                return dict(group["weights"])
    return {}


def quantization_details(config: dict[str, Any]) -> dict[str, str]:
    """Return the artifact metadata naming a checkpoint's real format (empty when unquantized).

    Keys: ``quant_method``, and where the config says them ``quant_bits``, ``quant_group_size``,
    ``quant_format`` (packing / checkpoint format), ``quant_sym``, ``quant_desc_act`` and
    ``quantizer`` (the library and version that wrote it, from ``meta.quantizer``).
    """
    q = config.get("quantization_config") or {}
    if not isinstance(q, dict) or not q:
        return {}
    method = str(q.get("quant_method", "unknown"))
    fields: dict[str, Any] = {"quant_method": method}
    if method == "compressed-tensors":
        weights = _compressed_tensors_weights(q)
        fields.update(quant_bits=weights.get("num_bits"), quant_group_size=weights.get("group_size"),
                      quant_format=q.get("format"), quant_sym=weights.get("symmetric"))
    else:
        fields.update(quant_bits=q.get("bits"), quant_group_size=q.get("group_size"),
                      quant_format=q.get("checkpoint_format") or q.get("format") or q.get("version"),
                      quant_sym=q.get("sym") if "sym" in q else
                      (not q["zero_point"] if isinstance(q.get("zero_point"), bool) else None),
                      quant_desc_act=q.get("desc_act"))
    meta = q.get("meta")
    if isinstance(meta, dict) and meta.get("quantizer"):
        quantizer = meta["quantizer"]
        fields["quantizer"] = ",".join(map(str, quantizer)) if isinstance(quantizer, list) else quantizer
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items() if v is not None}


def _root(obj: Any) -> str:
    return type(obj).__module__.split(".")[0]


def loaded_kernel(model: Any, device: str) -> str | None:
    """Return which quantization kernel a loaded model runs on, or None for a dense model.

    Names each module class (and weight tensor subclass) that comes from a package other
    than torch and transformers, with that package's version, e.g.
    ``gptqmodel/7.6.0:TorchQuantLinear on cpu``. compressed-tensors keeps ``nn.Linear``
    modules and attaches its scheme: it is named by the scheme attribute.
    """
    kernels: set[str] = set()
    for module in model.modules():
        root = _root(module)
        if root not in _DENSE_PACKAGES:
            kernels.add(f"{root}/{version_of(root.replace('_', '-'))}:{type(module).__name__}")
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and _root(weight) not in _DENSE_PACKAGES:
            kernels.add(f"{_root(weight)}/{version_of(_root(weight))}:{type(weight).__name__}")
        elif getattr(module, "quantization_scheme", None) is not None:
            kernels.add(f"compressed_tensors/{version_of('compressed-tensors')}:{type(module).__name__}")
    if not kernels:
        return None
    return f"{','.join(sorted(kernels))} on {device}"


def load_failure(artifact: Artifact, device: str, exc: BaseException) -> ModelLoadError:
    """Return the one-paragraph error for a checkpoint transformers could not load here (exit 2).

    Names the format (method, packing format, bits, group size), the device and the
    packages that hold its kernels with their versions, and the loader's first line, so a
    format without a kernel on this machine (say GPTQ in Marlin packing on a CPU) reads as
    that, never as a traceback.
    """
    meta = artifact.metadata
    method = meta.get("quant_method")
    form = ", ".join(f"{label} {meta[key]}" for key, label in
                     (("quant_format", "format"), ("quant_bits", "bits"), ("quant_group_size", "group size"))
                     if meta.get(key))
    kernels = [f"{pip} {version_of(pip)}" for _, pip in QUANT_PACKAGES.get(method or "", ())]
    reason = (str(exc).strip().splitlines() or [""])[0][:300]
    what = f"the {artifact.quantization} checkpoint" + (f" ({form})" if form else "")
    via = f" through {', '.join(kernels)}" if kernels else ""
    return ModelLoadError(
        f"transformers cannot load {what} on {device}{via}: {type(exc).__name__}: {reason}"
        , where=artifact.ref,
        fix="this format needs a kernel or package this machine lacks; use a runner that has it (a GPU for "
            "Marlin/ExLlama packings), or screen a format that loads here (GGUF, bitsandbytes, torchao, GPTQ in "
            "gptq packing, AWQ in gemm packing)")
