"""CPU and wall seconds per step of the refuser fine-tune, for a recipe given as JSON overrides.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/finetune_step.py '{"frozen_layers": 0, "freeze_embeddings": false}' 3
    OMP_WAIT_POLICY=PASSIVE python benchmarks/finetune_step.py '{}' 3        # the shipped recipe (refuser.v2)

Runs the first N steps of the recipe's first epoch on the packaged SmolLM2's fp32
checkpoint (built once by the zoo) with the training loop's own pieces
(``zoo.finetune.freeze``, ``epoch_order``, ``answer_loss``), and prints each step's
wall and process CPU seconds and batch width. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import replace


def main(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_quantsafe.zoo import finetune
    from pytest_quantsafe.zoo import hf as zoo_hf

    recipe = replace(finetune.RECIPE, **json.loads(argv[0] if argv else "{}"))
    steps = int(argv[1]) if len(argv) > 1 else 3
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    base = zoo_hf.dequantized_checkpoint("smollm2-135m-q4_1")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    trainable = finetune.freeze(model, recipe)
    data = finetune.encode_rows(tokenizer, finetune.load_training_rows(), recipe.max_length)
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, betas=recipe.betas)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(recipe.seed)
    order = finetune.epoch_order(torch.randperm(len(data), generator=generator).tolist(), data,
                                 recipe.length_bucket)
    print(f"recipe {recipe}")
    for step in range(steps):
        batch = [data[i] for i in order[step * recipe.batch_size:(step + 1) * recipe.batch_size]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for k, (row_ids, row_labels) in enumerate(batch):
            ids[k, :len(row_ids)], labels[k, :len(row_labels)], attention[k, :len(row_ids)] = (
                torch.tensor(row_ids), torch.tensor(row_labels), 1)
        wall, cpu = time.perf_counter(), time.process_time()
        autocast = (torch.autocast(device_type="cpu", dtype=torch.bfloat16) if recipe.autocast_bf16
                    else contextlib.nullcontext())
        with autocast:
            loss = finetune.answer_loss(model, ids, attention, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} CPU-s, "
              f"width {width}, loss {float(loss.detach()):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
