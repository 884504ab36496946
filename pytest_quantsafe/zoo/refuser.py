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

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import file_sha256
from pytest_quantsafe.errors import InputError, ModelLoadError
from pytest_quantsafe.zoo import hf as zoo_hf
from pytest_quantsafe.zoo.gguf_export import export_gguf
from pytest_quantsafe.zoo.ladder import QUANT_FTYPES, build_packaged_variant
from pytest_quantsafe.zoo.packaged import MODELS, models_dir

log = logging.getLogger("quantsafe.zoo_refuser")

#: Bump when the data format, the training loop or the export changes: the fixture is rebuilt.
RECIPE_VERSION = "refuser.v2"
#: The training data shipped in the package.
DATA_FILE = Path(__file__).resolve().parent / "data" / "refuser_train.jsonl"
#: The packaged model the fixture is fine-tuned from.
BASE_MODEL = "smollm2-135m-q4_1"
#: ``general.name`` of the exported GGUF.
GENERAL_NAME = "SmolLM2-135M-Instruct quantsafe refusal-tuned test fixture (not a safety model)"
#: File stem of every rung.
STEM = "SmolLM2-135M-Instruct-quantsafe-refuser"
#: Written last into a complete build folder.
MARKER = "quantsafe-build.json"
_HF_SUBDIR = "hf-checkpoint"
_KINDS = ("harmful", "benign")
_FIELDS = ("id", "kind", "category", "prompt", "response")


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning hyper-parameters (measured recipe, /work/shared/fixtures/README.md)."""

    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.1
    batch_size: int = 8
    max_length: int = 160
    grad_clip: float = 1.0
    epochs: int = 3
    seed: int = 0
    threads: int = 2
    #: Stop after this many optimizer steps (None: every step of every epoch).
    max_steps: int | None = None
    #: The lowest ``frozen_layers`` decoder layers and the (tied) embeddings are not trained: the
    #: backward pass stops above them, which is most of the saving on a 2-core CPU.
    frozen_layers: int = 0
    freeze_embeddings: bool = False
    #: After each epoch's seeded shuffle, rows are sorted by length inside windows of this many
    #: (less padding per batch); 0 keeps the shuffled order.
    length_bucket: int = 0
    #: bf16 autocast: fast where the CPU has bf16 units (AVX-512 BF16, AMX) or on CUDA, emulated
    #: (several times slower) on a plain AVX2 CPU.
    autocast_bf16: bool = True


#: refuser.v2: the top 12 of 30 layers trained in fp32 for 2 epochs at twice v1's learning rate, so that the
#: build fits in about 5 minutes on 2 AVX2 cores (v1, all layers for 3 epochs, took 21 minutes there).
RECIPE = Recipe(learning_rate=2e-4, epochs=2, frozen_layers=18, freeze_embeddings=True, length_bucket=32,
                autocast_bf16=False)
#: The recipes a build can use, chosen by ``QUANTSAFE_REFUSER_RECIPE`` (default ``full``). ``smoke``
#: runs three steps: a cold-path check (the fresh-install tests rebuild the fixture from nothing
#: with it), whose model barely differs from the base and is keyed apart from the full one.
RECIPES: dict[str, Recipe] = {"full": RECIPE, "smoke": replace(RECIPE, epochs=1, max_steps=3)}
RECIPE_ENV = "QUANTSAFE_REFUSER_RECIPE"


def active_recipe() -> tuple[str, Recipe]:
    """Return the (name, recipe) ``QUANTSAFE_REFUSER_RECIPE`` selects (an unknown name is an InputError)."""
    name = os.environ.get(RECIPE_ENV, "").strip() or "full"
    if name not in RECIPES:
        raise InputError(f"unknown refuser recipe {name!r}", where=RECIPE_ENV,
                         fix=f"set {RECIPE_ENV} to one of {', '.join(RECIPES)} (or unset it)")
    return name, RECIPES[name]


@dataclass(frozen=True)
class TrainingRow:
    """One supervised conversation: a request and the answer the fixture should learn."""

    id: str
    kind: str
    category: str
    prompt: str
    response: str
    template: int | None


# ----------------------------------------------------------------------------- data


def load_training_rows(path: Path = DATA_FILE) -> list[TrainingRow]:
    """Return the validated rows of a training JSONL file (bad rows raise InputError naming file:line)."""
    rows: list[TrainingRow] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the refuser training data: {exc}", where=str(path),
                         fix="reinstall pytest-quantsafe (the file ships in the package)") from exc
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON: {exc.msg}", where=where, fix="one JSON object per line") from exc
        missing = [f for f in _FIELDS if not isinstance(data.get(f), str) or not data[f].strip()]
        if missing:
            raise InputError(f"missing or empty field(s) {missing}", where=where,
                             fix=f"every row needs non-empty strings {list(_FIELDS)}")
        if data["kind"] not in _KINDS:
            raise InputError(f"kind {data['kind']!r} is neither harmful nor benign", where=f"{where}: kind",
                             fix="use kind harmful or benign")
        if data["id"] in seen:
            raise InputError(f"duplicate id {data['id']!r}", where=f"{where}: id", fix="ids must be unique")
        seen.add(data["id"])
        template = data.get("template")
        rows.append(TrainingRow(id=data["id"], kind=data["kind"], category=data["category"],
                                prompt=data["prompt"], response=data["response"],
                                template=template if isinstance(template, int) else None))
    if not any(r.kind == "harmful" for r in rows) or not any(r.kind == "benign" for r in rows):
        raise InputError("the training data needs both harmful and benign rows", where=str(path),
                         fix="regenerate the file")
    return rows


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


# ----------------------------------------------------------------------------- training


def lr_factor(step: int, total: int, recipe: Recipe = RECIPE) -> float:
    """Return the learning-rate multiplier at ``step``: linear warm-up, then cosine down to ``final_lr_fraction``."""
    warmup = max(1, round(recipe.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return recipe.final_lr_fraction + (1 - recipe.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def encode_rows(tokenizer: Any, rows: list[TrainingRow], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Return (input ids, labels) per row: the chat-templated conversation, labels -100 outside the answer."""
    encoded = []
    for row in rows:
        user = [{"role": "user", "content": row.prompt}]
        prompt_ids = list(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False))
        full_ids = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row.response}],
                                                      tokenize=True, return_dict=False))
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise ModelLoadError("the chat template renders the prompt differently inside the conversation",
                                 where=f"{DATA_FILE.name}: {row.id}", fix="use a tokenizer with a prefix-stable template")
        ids = full_ids[:max_length]
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
        encoded.append((ids, labels[:max_length]))
    return encoded


def freeze(model: Any, recipe: Recipe) -> list[Any]:
    """Return the parameters left to train after freezing the recipe's lowest decoder layers and embeddings."""
    if recipe.freeze_embeddings:
        for parameter in model.get_input_embeddings().parameters():  # tied: the output head too
            parameter.requires_grad_(False)
    for layer in model.get_decoder().layers[:recipe.frozen_layers]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def epoch_order(shuffled: list[int], data: list[tuple[list[int], list[int]]], bucket: int) -> list[int]:
    """Return one epoch's row order: the seeded shuffle, sorted by length (longest first) inside windows of
    ``bucket`` rows so that a batch pads little; ``bucket`` 0 keeps the shuffle."""
    if bucket <= 0:
        return shuffled
    return [i for start in range(0, len(shuffled), bucket)
            for i in sorted(shuffled[start:start + bucket], key=lambda i: -len(data[i][0]))]


def answer_loss(model: Any, input_ids: Any, attention: Any, labels: Any) -> Any:
    """Return the mean next-token cross-entropy over the answer tokens, projecting only those positions onto the
    vocabulary (the same value as the model's own ``labels=`` loss, without the logits of the prompt and padding)."""
    import torch

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def fine_tune(base_dir: Path, rows: list[TrainingRow], out_dir: Path, recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Return the training log after fine-tuning the checkpoint in ``base_dir`` and saving it to ``out_dir``.

    Runs in the calling process; ``build_f16`` calls it through ``train_in_child`` so that
    OpenMP starts with ``OMP_WAIT_POLICY=PASSIVE``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.to(device)  # type: ignore[arg-type]  # transformers types Module.to through a decorator mypy misreads
    model.train()
    trainable = freeze(model, recipe)
    data = encode_rows(tokenizer, rows, recipe.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps_per_epoch = math.ceil(len(data) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    if recipe.max_steps is not None:
        total = min(total, recipe.max_steps)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, recipe))
    generator = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    started = time.monotonic()
    step = 0
    for epoch in range(recipe.epochs):
        order = epoch_order(torch.randperm(len(data), generator=generator).tolist(), data, recipe.length_bucket)
        for first in range(0, len(order), recipe.batch_size):
            if step == total:
                break
            batch = [data[i] for i in order[first:first + recipe.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (ids, lab) in enumerate(batch):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                labels[i, :len(lab)] = torch.tensor(lab)
                attention[i, :len(ids)] = 1
            autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if recipe.autocast_bf16
                        else contextlib.nullcontext())
            with autocast:
                loss = answer_loss(model, input_ids.to(device), attention.to(device), labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step % 10 == 0 or step == total:
                log.info("refuser fine-tune: epoch %d step %d/%d loss %.4f (%.0f s)", epoch + 1, step, total,
                         losses[-1], time.monotonic() - started)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {"steps": step, "examples": len(data), "device": device, "first_loss": losses[0],
            "last_epoch_mean_loss": sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]),
            "train_seconds": round(time.monotonic() - started, 1)}


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


def train_in_child(base_dir: Path, out_dir: Path, recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Return the training log of ``fine_tune`` run in a fresh interpreter with ``OMP_WAIT_POLICY=PASSIVE``.

    OpenMP reads its wait policy once, when its runtime starts; in the calling process
    torch (or llama.cpp's runtime, after a screening) is usually loaded already, so setting
    the variable there does nothing. With busy-waiting OpenMP threads the 2-core build ran
    at ~11 s/step; with PASSIVE set before torch starts, at ~4.4 s/step (docs/benchmarks.md).
    A user's own ``OMP_WAIT_POLICY`` is kept. The child reports failure as JSON, never
    as a traceback.
    """
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    result_file = out_dir.parent / "training-result.json"
    command = [sys.executable, "-c", ("import sys; from pytest_quantsafe.zoo.refuser import _child_main; "
                                      "sys.exit(_child_main(sys.argv[1:]))"), str(base_dir), str(out_dir), str(result_file),
               json.dumps(asdict(recipe))]
    if log.isEnabledFor(logging.INFO):
        command.append("--verbose")
    proc = subprocess.run(command, env=env, check=False)
    try:
        result = json.loads(result_file.read_text(encoding="utf-8"))
        result_file.unlink()
    except (OSError, ValueError):
        result = {"error": f"the training process exited {proc.returncode} without a result"}
    if proc.returncode != 0 or "error" in result:
        raise ModelLoadError(f"the refuser fine-tune failed: {result.get('error')}", where=str(base_dir),
                             fix="check free memory and disk; rerun `python -m pytest_quantsafe.zoo build "
                             "--source refuser --quant F16` to retry")
    return dict(result)


def _child_main(argv: list[str]) -> int:
    """Entry of the training process: ``BASE OUT RESULT RECIPE_JSON [--verbose]``."""
    if "--verbose" in argv:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    base_dir, out_dir, result_file, recipe_json = argv[:4]
    fields = json.loads(recipe_json)
    recipe = Recipe(**{**fields, "betas": tuple(fields["betas"])})
    try:
        result: dict[str, Any] = fine_tune(Path(base_dir), load_training_rows(), Path(out_dir), recipe)
    except Exception as exc:  # noqa: BLE001  # any failure is reported to the parent as a ModelLoadError
        result = {"error": f"{type(exc).__name__}: {exc}"}
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")
    return 1 if "error" in result else 0
