"""Run by the quantizer venv's own Python (``zoo/quantizer.py``): one GPTQ or AWQ quantization with gptqmodel.

This file is executed as a script inside a virtual environment that has torch and
gptqmodel but not pytest_quantsafe, so it imports nothing from the package. It reads a
job (JSON), quantizes the checkpoint, saves it with gptqmodel's own ``save`` and writes a
result (JSON) with the library versions and timings, or ``{"error": ...}``: a failure
reaches the parent as a sentence, never as a traceback on the user's terminal.

Usage: ``python _quantize_worker.py JOB.json RESULT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def _calibration_texts(tokenizer: Any, rows: list[dict[str, str]]) -> list[str]:
    """Return each calibration conversation rendered by the checkpoint's own chat template."""
    texts = []
    for row in rows:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def quantize(job: dict[str, Any]) -> dict[str, Any]:
    """Return the result of quantizing ``job["source"]`` into ``job["out"]`` as ``job`` says."""
    import torch

    torch.manual_seed(int(job["seed"]))
    torch.set_num_threads(int(job["threads"]))
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["source"])
    texts = _calibration_texts(tokenizer, job["calibration"])
    config = QuantizeConfig(method=job["method"], format=job["format"], bits=int(job["bits"]),
                            group_size=int(job["group_size"]), sym=bool(job["sym"]), desc_act=bool(job["desc_act"]),
                            offload_to_disk=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    model = GPTQModel.load(job["source"], config, device=device, dtype=getattr(torch, job["dtype"]))
    loaded = time.monotonic()
    model.quantize(texts, batch_size=int(job["batch_size"]), tokenizer=tokenizer, backend=BACKEND(job["backend"]))
    quantized = time.monotonic()
    model.save(job["out"])
    tokenizer.save_pretrained(job["out"])
    return {"device": device, "calibration_rows": len(texts),
            "versions": {p: metadata.version(p) for p in ("gptqmodel", "torch", "transformers")},
            "load_seconds": round(loaded - started, 1), "quantize_seconds": round(quantized - loaded, 1),
            "save_seconds": round(time.monotonic() - quantized, 1)}


def main(argv: list[str]) -> int:
    """Entry: ``JOB.json RESULT.json``; exit 0 with a result, 1 with ``{"error": ...}``."""
    job_file, result_file = argv[:2]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GPTQMODEL_OFFLINE", "1")
    # gptqmodel 7.6 sizes its CPU pool as half the cores but asks 2 workers for model loading:
    # on a 2-core machine it fails with "Virtual pool 'model_loader:cpu' requests 2 workers".
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 1) // 2)))
    try:
        result = quantize(json.loads(Path(job_file).read_text(encoding="utf-8")))
    except Exception as exc:  # noqa: BLE001  # every failure goes back to the parent as a sentence
        result = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    Path(result_file).write_text(json.dumps(result), encoding="utf-8")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
