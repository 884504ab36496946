"""The machine's matrix-multiply limits, for the engine benchmark's roofline share.

Two reference rates, both in GFLOP/s on ``threads`` threads:

- **llama.cpp prompt evaluation** of the same GGUF: 512 tokens in one micro-batch with
  logits for every token, so each token costs the same matrix products as one decoding
  step (every weight matrix and the output layer). FLOPs = tokens x 2 x the matrix
  parameters (``matmul_params``); attention's own products are left out, as in the
  decoder's figure. This is the peak the weight types can give in llama.cpp's kernels.
- **numpy/BLAS fp32 GEMM** (2048 x 2048), for comparison with a dense library.

Each runs in a child process (``python benchmarks/roofline.py pp|gemm ...``) so that
its threads and load options are its own. Speed figures belong in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class MatmulParams:
    """Matrix parameters one token multiplies: the transformer blocks' and the output layer's."""

    body: int
    head: int
    types: str

    @property
    def flops_per_token(self) -> int:
        """Return 2 x the parameters every decoded token multiplies (a multiply and an add each)."""
        return 2 * (self.body + self.head)


def matmul_params(path: Path) -> MatmulParams:
    """Return the matrix parameters of a GGUF (the tied embedding counts as the output layer)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    body = head = 0
    types: dict[str, int] = {}
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    for tensor in reader.tensors:
        n = int(tensor.n_elements)
        if tensor.name == "output.weight" or (tied and tensor.name == "token_embd.weight"):
            head = n
        elif tensor.name.startswith("blk.") and tensor.name.endswith(".weight") and len(tensor.shape) == 2:
            body += n
        else:
            continue
        kind = tensor.tensor_type.name
        types[kind] = types.get(kind, 0) + n
    return MatmulParams(body=body, head=head,
                        types=", ".join(f"{k} {v / 1e6:.0f}M" for k, v in sorted(types.items(), key=lambda kv: -kv[1])))


def _child(args: list[str], threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)], capture_output=True,
                         text=True, env=env, check=True, timeout=1800)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def prompt_eval_rate(path: Path, threads: int, *, use_extra_bufts: bool = False, tokens: int = 512) -> dict[str, float]:
    """Return llama.cpp's prompt-evaluation rate on ``path``: {"tokens_per_s", "seconds"} (best of 3)."""
    args = ["pp", str(path), "--tokens", str(tokens)] + (["--extra-bufts"] if use_extra_bufts else [])
    return _child(args, threads)


def blas_gemm_gflops(threads: int, n: int = 2048) -> dict[str, float]:
    """Return numpy's fp32 GEMM rate: {"gflops", "seconds"} (best of 5, n x n times n x n)."""
    return _child(["gemm", "--n", str(n)], threads)


def _run_pp(path: str, threads: int, tokens: int, extra: bool) -> dict[str, float]:
    from pytest_quantsafe.engines.llamacpp._decode import GroupShape
    from pytest_quantsafe.engines.llamacpp._worker import _Model
    from pytest_quantsafe.probes import load_probes

    model = _Model({"path": path, "n_threads": threads, "use_extra_bufts": extra, "flash_attn": True})
    text = " ".join(p.prompt for p in load_probes().items)
    ids = (model.tokenize(text) * 4)[:tokens]
    model.ensure_context(GroupShape(n_seq=1, n_ctx=((tokens + 255) // 256) * 256, n_batch=tokens, shared=0))
    lib, best = model.lib, float("inf")
    for _ in range(3):
        lib.llama_memory_clear(lib.llama_get_memory(model.ctx), True)
        for i, token in enumerate(ids):
            model.put(model.batch, i, token, i, 0, True)
        model.batch.n_tokens = len(ids)
        started = time.perf_counter()
        if lib.llama_decode(model.ctx, model.batch) != 0:
            raise RuntimeError("llama_decode failed")
        best = min(best, time.perf_counter() - started)
    model.close()
    return {"tokens_per_s": len(ids) / best, "seconds": best}


def _run_gemm(n: int) -> dict[str, float]:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool and pages
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return {"gflops": 2 * n**3 / best / 1e9, "seconds": best}


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: ``pp MODEL [--tokens N] [--extra-bufts]`` or ``gemm [--n N]``; prints one JSON line."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("pp", "gemm"))
    ap.add_argument("model", nargs="?")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--extra-bufts", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "pp":
        result = _run_pp(args.model, args.threads, args.tokens, args.extra_bufts)
    else:
        result = _run_gemm(args.n)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
