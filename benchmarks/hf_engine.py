"""Generation throughput of the hf engine (transformers) on SmolLM2-135M, the way a screening runs it.

Same probes, greedy, generation time only (loading is timed apart), through
``pytest_quantsafe.engines.hf`` itself:

  fp32 batched (batch 16), fp32 one prompt at a time, bf16 batched, bitsandbytes nf4 batched.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/hf_engine.py [--probes 16] [--max-new-tokens 32]
        [--threads 2]

Prints a Markdown table for docs/benchmarks.md. Speed figures belong here, never in timed tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_quantsafe.engines.base import get_engine
from pytest_quantsafe.probes import load_probes, select
from pytest_quantsafe.types import GenerationConfig
from pytest_quantsafe.zoo import hf as zoo_hf


def run(label: str, ref: Path, probes: list, config: GenerationConfig, **options: object) -> str:
    """Return one Markdown row: load time, generation time, generated tokens per second."""
    backend = get_engine("hf", **options)
    try:
        art = backend.resolve(str(ref))
        t0 = time.perf_counter()
        backend.generate(art, probes[:1], GenerationConfig(max_new_tokens=1))  # load + warm up
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = backend.generate(art, probes, config)
        gen = time.perf_counter() - t0
    finally:
        backend.close()
    tokens = sum(c.n_tokens for c in out)
    return f"| {label} | {load:.1f} s | {gen:.1f} s | {tokens} | {tokens / gen:.1f} |"


def main() -> int:
    """Run the four configurations and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = zoo_hf.dequantized_checkpoint()
    nf4 = zoo_hf.quantized_variant(base, "bnb-nf4")
    probes = list(select(load_probes(), args.probes // 2, args.probes - args.probes // 2).items)
    batched = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.probes)
    single = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"threads {args.threads}, {len(probes)} probes x {args.max_new_tokens} new tokens")
    print("| configuration | load | generation | tokens | tokens/s |\n|---|---:|---:|---:|---:|")
    print(run(f"fp32, batch {args.probes}", base, probes, batched, threads=args.threads))
    print(run("fp32, one at a time", base, probes, single, threads=args.threads))
    print(run(f"bf16, batch {args.probes}", base, probes, batched, threads=args.threads, dtype="bfloat16"))
    print(run(f"bitsandbytes nf4, batch {args.probes}", nf4, probes, batched, threads=args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
