"""The refuser fixture's fine-tune: its training data, its recipes and the training loop (in a child process).

``zoo/refuser.py`` builds and caches the fixture; this module is what it runs. The
recipe in force is ``active_recipe()``: ``full`` (``RECIPE``) unless
``QUANTSAFE_REFUSER_RECIPE`` names another. The loop is plain PyTorch on a
transformers causal LM: AdamW, linear warm-up then cosine decay, gradient clipping,
the loss on the answer tokens only, fixed seeds and a seeded shuffle per epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pytest_quantsafe.errors import InputError, ModelLoadError

log = logging.getLogger("quantsafe.zoo_refuser")

#: The training data shipped in the package.
DATA_FILE = Path(__file__).resolve().parent / "data" / "refuser_train.jsonl"
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
    command = [sys.executable, "-c", ("import sys; from pytest_quantsafe.zoo.finetune import _child_main; "
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
