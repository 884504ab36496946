"""Engine "hf": Hugging Face checkpoints through transformers + torch.

References: a local checkpoint folder (with ``config.json``), ``hf://org/repo@revision``
(through ``huggingface_hub``; the cache is used offline first, and the resolved
commit is pinned into the artifact), or a ``.gguf`` file loaded with ``gguf_file=``
(a GGUF baseline dequantized by transformers). Every weight file is hashed into
the artifact.

Generation: batches of ``config.batch_size`` prompts, the tokenizer's chat
template, left padding, greedy decoding (``temperature`` 0) or seeded sampling,
``torch.manual_seed(config.seed)`` before each batch. A completion's token count
is the number of generated tokens before the first end-of-sequence token.

Device and speed: CUDA when present, CPU otherwise (``device=`` overrides).
``threads=`` sets ``torch.set_num_threads`` on CPU. On a busy CPU box set
``OMP_WAIT_POLICY=PASSIVE`` before Python starts (OpenMP reads it once, when torch
loads; measured here it took 2 threads under load from 2.9 to 35 tokens/s);
``create`` sets it as a default when torch is not imported yet.

Quantized checkpoints load through transformers' own quantizers (bitsandbytes
nf4/int8, compressed-tensors, GPTQ through optimum + gptqmodel, AWQ through gptqmodel,
quanto, torchao, ...); ``engines/hf_quant.py`` reads the real format from
``quantization_config`` into the artifact (method, bits, group size, packing, symmetry,
the library that wrote it) and, after loading, names the kernel the weights run on
(``kernel(artifact)``, the record's ``engine.kernel``; on CPU gptqmodel picks
``TorchAtenLinear`` for GPTQ). The package a format needs is checked before loading, and a
checkpoint that cannot load on this machine is a ModelLoadError (exit 2) naming the
missing package, or the format, device and kernel packages with the loader's first line
(GPTQ in Marlin packing on a CPU: "No valid quant linear").
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import MODEL_CONFIG, file_sha256, model_folder_files, safe_path
from pytest_quantsafe.engines.base import OnResult
from pytest_quantsafe.engines.hf_quant import (
    load_failure,
    loaded_kernel,
    missing_packages,
    quantization_details,
    quantization_label,
)
from pytest_quantsafe.engines.hf_quant import version_of as _version
from pytest_quantsafe.errors import EngineError, ModelLoadError, UsageError
from pytest_quantsafe.types import Artifact, ArtifactFile, Completion, GenerationConfig, Probe, sha256_hex

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _parse_hub_ref(ref: str) -> tuple[str, str | None]:
    body = ref[len("hf://"):]
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UsageError(f"not a hub reference: {ref!r}", where=ref, fix="write it as hf://org/repo@revision")
    return repo, (revision or None)


class HFEngine:
    """transformers + torch engine for local and hub checkpoints."""

    name = "hf"

    def __init__(self, *, device: str | None = None, dtype: str = "auto", threads: int | None = None,
                 gguf_file: str | None = None, trust_remote_code: bool = False,
                 cache_dir: str | None = None, chat_template: str | None = None) -> None:
        if dtype not in _DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", where="engine option dtype", fix=f"choose one of {_DTYPES}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}", where="engine option threads")
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.gguf_file = gguf_file
        self.trust_remote_code = trust_remote_code
        #: Hub cache folder (default: huggingface_hub's, i.e. HF_HUB_CACHE).
        self.cache_dir = cache_dir
        #: A Jinja chat template file that replaces the tokenizer's (for checkpoints without one).
        self.chat_template = Path(chat_template).read_text() if chat_template else None
        self._loaded: tuple[str, Any, Any] | None = None  # (artifact digest, model, tokenizer)
        self._kernel: tuple[str, str | None] | None = None  # (artifact digest, kernel)

    def engine_id(self) -> str:
        """Return "transformers/<version>+torch/<version>"."""
        return f"transformers/{_version('transformers')}+torch/{_version('torch')}"

    # ------------------------------------------------------------------ resolve

    def _hub_snapshot(self, ref: str) -> tuple[Path, dict[str, str]]:
        repo, revision = _parse_hub_ref(ref)
        try:
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError as exc:
            raise ModelLoadError("hub references need huggingface_hub", where=ref,
                                 fix="pip install 'pytest-quantsafe[hf]'") from exc
        try:
            folder = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=self.cache_dir)
        except LocalEntryNotFoundError:
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
                raise ModelLoadError(f"{repo}@{revision or 'main'} is not in the local hub cache and "
                                     "HF_HUB_OFFLINE is set", where=ref,
                                     fix="download it once with network access, or point at a local folder")
            try:
                folder = snapshot_download(repo, revision=revision, cache_dir=self.cache_dir)
            except Exception as exc:  # network, auth, missing revision: all one answer to the user
                raise ModelLoadError(f"cannot fetch {repo}@{revision or 'main'}: {exc}", where=ref,
                                     fix="check the repository, the revision and network access") from exc
        path = Path(folder)
        commit = path.name
        meta = {"hub_repo": repo, "hub_revision": revision or "main", "hub_commit": commit}
        return path, meta

    def resolve(self, ref: str) -> Artifact:
        """Return the checkpoint's artifact: sha256 of every weight file, config-derived metadata."""
        meta: dict[str, str] = {}
        if ref.startswith("hf://"):
            folder, meta = self._hub_snapshot(ref)
        else:
            folder = safe_path(ref, "model checkpoint")
        gguf_name = self.gguf_file
        if folder.is_file() and folder.suffix.lower() == ".gguf":
            folder, gguf_name = folder.parent, folder.name
        if not folder.is_dir():
            raise ModelLoadError(f"no checkpoint at {ref!r}", where=ref,
                                 fix="pass a folder with config.json, hf://org/repo@revision or a .gguf file")
        if gguf_name:
            weights = [folder / gguf_name]
            if not weights[0].is_file():
                raise ModelLoadError(f"no GGUF file {gguf_name!r} in {folder}", where=str(folder / gguf_name))
            config: dict[str, Any] = {}
            meta["gguf_file"] = gguf_name
        else:
            weights, found_config = model_folder_files(folder)
            config_path = folder / MODEL_CONFIG
            if found_config is None:
                raise ModelLoadError(f"{folder} has no config.json", where=str(folder),
                                     fix="pass a transformers checkpoint folder")
            try:
                config = json.loads(config_path.read_text())
            except ValueError as exc:
                raise ModelLoadError(f"config.json is not JSON: {exc}", where=str(config_path),
                                     fix="restore the checkpoint's config.json (download or copy it again)") from exc
            if not isinstance(config, dict):
                raise ModelLoadError("config.json is not a JSON object", where=str(config_path),
                                     fix="restore the checkpoint's config.json (download or copy it again)")
            if not weights:
                raise ModelLoadError(f"{folder} holds no weight files", where=str(folder),
                                     fix="the folder needs *.safetensors (or *.bin) next to config.json")
            weights.append(config_path)
        files = tuple(ArtifactFile(str(p.absolute()), file_sha256(p), p.stat().st_size) for p in weights)
        arch = (config.get("architectures") or ["unknown"])[0] if config else "gguf"
        meta.update({"architecture": str(arch), "model_type": str(config.get("model_type", "unknown")),
                     "vocab_size": str(config.get("vocab_size", "unknown"))})
        meta.update(quantization_details(config))
        template = folder / "chat_template.jinja"
        if self.chat_template is not None:
            meta["chat_template_sha256"] = sha256_hex(self.chat_template.encode("utf-8"))
            meta["chat_template_source"] = "override"
        elif template.is_file():
            meta["chat_template_sha256"] = sha256_hex(template.read_bytes())
        elif (folder / "tokenizer_config.json").is_file():
            try:
                inline = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
            except ValueError:
                inline = None
            if isinstance(inline, str):
                meta["chat_template_sha256"] = sha256_hex(inline.encode("utf-8"))
        quantization = quantization_label(config) if config else "gguf-dequantized"
        name = meta.get("hub_repo", "").replace("/", "_") or (gguf_name or folder.name)
        return Artifact(ref=ref, format="hf", files=files, quantization=quantization, name=name, metadata=meta)

    # ------------------------------------------------------------------ load

    def _torch_dtype(self, torch: Any, device: str) -> Any:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    def _load(self, artifact: Artifact) -> tuple[Any, Any]:
        if self._loaded is not None and self._loaded[0] == artifact.digest:
            return self._loaded[1], self._loaded[2]
        self.close()
        method = artifact.metadata.get("quant_method")
        missing = missing_packages(method)
        if missing:
            raise ModelLoadError(f"the checkpoint is {method}-quantized and transformers needs the package(s) "
                                 f"{', '.join(missing)}, not installed here", where=artifact.ref,
                                 fix=f"pip install {' '.join(missing)} (or screen it on a runner that has them)")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ModelLoadError(f"the hf engine needs torch and transformers: {exc}",
                                 fix="pip install 'pytest-quantsafe[hf]'") from exc
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu" and self.threads:
            torch.set_num_threads(self.threads)
        folder = Path(artifact.files[0].path).parent
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if artifact.metadata.get("gguf_file"):
            kwargs["gguf_file"] = artifact.metadata["gguf_file"]
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=self._torch_dtype(torch, device),
                                                         device_map=device, **kwargs)
        except Exception as exc:  # a quantizer's own exception types vary: one answer
            raise load_failure(artifact, device, exc) from exc
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if tokenizer.chat_template is None:
            raise ModelLoadError("the tokenizer has no chat template", where=artifact.ref,
                                 fix="screen an instruction-tuned checkpoint that ships a chat template")
        self._loaded = (artifact.digest, model, tokenizer)
        self._kernel = (artifact.digest, loaded_kernel(model, device) if method else None)
        return model, tokenizer

    def kernel(self, artifact: Artifact) -> str | None:
        """Return the quantization kernel ``artifact`` runs on here (``hf_quant.loaded_kernel``), None when dense.

        The record's ``engine.kernel``; a quantized checkpoint whose completions all came
        from the cache is loaded to find out."""
        if not artifact.metadata.get("quant_method"):
            return None
        if self._kernel is None or self._kernel[0] != artifact.digest:
            self._load(artifact)
        return self._kernel[1] if self._kernel is not None else None

    # ------------------------------------------------------------------ generate

    def _eos_ids(self, model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def generate(self, artifact: Artifact, probes: Sequence[Probe], config: GenerationConfig,
                 on_result: OnResult | None = None) -> list[Completion]:
        """Return one completion per probe, in order (batched, left-padded, greedy unless temperature > 0)."""
        import torch

        model, tokenizer = self._load(artifact)
        eos = self._eos_ids(model, tokenizer)
        batch_size = max(1, config.batch_size)
        out: list[Completion] = []
        for start in range(0, len(probes), batch_size):
            batch = probes[start:start + batch_size]
            prompts = []
            for probe in batch:
                messages = []
                if config.system_prompt is not None:
                    messages.append({"role": "system", "content": config.system_prompt})
                messages.append({"role": "user", "content": probe.prompt})
                prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            encoded = {k: v.to(model.device) for k, v in encoded.items()}
            torch.manual_seed(config.seed)
            sampling: dict[str, Any] = {"do_sample": False}
            if config.temperature > 0:
                sampling = {"do_sample": True, "temperature": config.temperature, "top_p": 1.0, "top_k": 0}
            try:
                with torch.no_grad():
                    generated = model.generate(**encoded, max_new_tokens=config.max_new_tokens,
                                               pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                                               **sampling)
            except RuntimeError as exc:
                raise EngineError(f"generation failed: {str(exc)[:400]}", where=f"{artifact.ref} probe {batch[0].id}",
                                  fix="lower batch_size or max_new_tokens, or check the device") from exc
            new_tokens = generated[:, encoded["input_ids"].shape[1]:].tolist()
            for probe, tokens in zip(batch, new_tokens):
                cut = next((i for i, t in enumerate(tokens) if t in eos), None)
                kept = tokens if cut is None else tokens[:cut]
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                completion = Completion(probe_id=probe.id, kind=probe.kind, category=probe.category, text=text,
                                        n_tokens=len(kept), finish_reason="length" if cut is None else "stop")
                out.append(completion)
                if on_result is not None:
                    on_result(completion)
        return out

    def close(self) -> None:
        """Drop the loaded model (and free CUDA memory when used)."""
        if self._loaded is None:
            return
        self._loaded = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


#: The options of ``create`` and their types (engines/options.py types ``KEY=VALUE`` strings by it).
OPTIONS: dict[str, type] = {"device": str, "dtype": str, "threads": int, "gguf_file": str,
                            "trust_remote_code": bool, "cache_dir": str, "chat_template": str}


def create(**options: Any) -> HFEngine:
    """Return a transformers engine (options: device, dtype, threads, gguf_file, trust_remote_code,
    cache_dir, chat_template); an unknown option is a UsageError."""
    known = set(OPTIONS)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"the hf engine has no option {', '.join(unknown)}", where="engine options",
                         fix=f"use {', '.join(sorted(known))}")
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return HFEngine(**options)
