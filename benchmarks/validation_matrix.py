"""The validation matrix on this machine: every format we can produce, screened against full precision.

For the refusal-tuned SmolLM2-135M (zoo ``refuser``) and Qwen2.5-Coder-0.5B (zoo ``qwen``):

- GGUF Q8_0, Q4_K_M, Q3_K_S, Q2_K (zoo ladders, llama.cpp engine) against the F16 rung;
- bitsandbytes nf4 and int8, torchao int8 weight-only (``zoo.hf.quantized_variant``, hf engine)
  against the fp32 checkpoint they were quantized from;
- GPTQ W4 and AWQ W4 through ``zoo.build_variant(source, "GPTQ-W4" / "AWQ-W4")`` (hf engine,
  against the fp32 checkpoint); while the zoo cannot build them the cell says
  "not produced: <the zoo's reason>".

Every cell is one full default-probe screening through ``screen.screen_models`` under the
default policy (the path ``quantsafe screen`` takes), writing its record under ``--out``.
Recipes are fixed in the zoo before the run (``RECIPES`` below names them); nothing is tuned
on the probes or on the results. Completions come from the completion cache when present,
so a rerun of the same cells reproduces the same records without generating again.

Then ``quantsafe calibrate`` (the CLI itself, in a child process) refits weights and ranges on
the screened cells' deltas, and the script writes the recalibrated profile and the Markdown
report (``benchmarks/validation_report.py``):

    nice -n 10 env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/validation_matrix.py \\
        --out quantsafe-validation --threads 2 --write

``--write`` replaces docs/validation.md and pytest_quantsafe/policies/calibration/cpu-matrix.yaml.
``--sources`` / ``--formats`` (or ``--cells source:format,...``) screen a subset; the report then
lists the cells left out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pytest_quantsafe import zoo
from pytest_quantsafe.errors import QuantSafeError
from pytest_quantsafe.policy import load_policy
from pytest_quantsafe.probes import load_probes
from pytest_quantsafe.screen import screen_models
from pytest_quantsafe.types import FEATURE_NAMES
from pytest_quantsafe.zoo import hf as zoo_hf
from pytest_quantsafe.zoo import refuser

#: The two models of the matrix: zoo source -> (what it is, family label for calibration).
SOURCES: dict[str, tuple[str, str]] = {
    "refuser": ("SmolLM2-135M refusal-tuned fixture (zoo refuser)", "smollm2"),
    "qwen": ("Qwen2.5-Coder-0.5B-Instruct (packaged; F16 dequantized from its Q4_K_M)", "qwen2"),
}

#: Every format of the matrix: name -> (engine, nominal weight bits, how it is produced). Fixed before the run.
RECIPES: dict[str, tuple[str, int, str]] = {
    "Q8_0": ("gguf", 8, "llama.cpp llama_model_quantize from the F16 rung (zoo.ladder)"),
    "Q4_K_M": ("gguf", 4, "llama.cpp llama_model_quantize from the F16 rung (zoo.ladder)"),
    "Q3_K_S": ("gguf", 3, "llama.cpp llama_model_quantize from the F16 rung (zoo.ladder)"),
    "Q2_K": ("gguf", 2, "llama.cpp llama_model_quantize from the F16 rung (zoo.ladder)"),
    "bnb-nf4": ("hf", 4, "bitsandbytes nf4, fp32 compute, from the fp32 checkpoint (zoo.hf)"),
    "bnb-int8": ("hf", 8, "bitsandbytes LLM.int8 from the fp32 checkpoint (zoo.hf)"),
    "torchao-int8": ("hf", 8, "torchao Int8WeightOnlyConfig from the fp32 checkpoint (zoo.hf)"),
    "GPTQ-W4": ("hf", 4, "zoo.build_variant(source, 'GPTQ-W4'), benign calibration text"),
    "AWQ-W4": ("hf", 4, "zoo.build_variant(source, 'AWQ-W4'), benign calibration text"),
}
BASELINES = {"gguf": "F16", "hf": "fp32"}
HF_ZOO = ("bnb-nf4", "bnb-int8", "torchao-int8")


@dataclass
class Cell:
    """One (source, format) cell: what was produced, screened, and its record (or why not)."""

    source: str
    fmt: str
    engine: str
    bits: int
    baseline: str | None = None
    candidate: str | None = None
    status: str = "pending"  # screened | not produced | not screened
    reason: str = ""
    record: dict[str, Any] | None = None
    record_path: str | None = None
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def cell_id(self) -> str:
        """Return "source:format"."""
        return f"{self.source}:{self.fmt}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, QuantSafeError):
        text = exc.message + (f" [{exc.where}]" if exc.where else "")
    else:  # a traceback that escaped the product: recorded as such, it is a bug to report
        text = f"uncaught {type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def baseline_path(source: str, engine: str) -> Path:
    """Return the full-precision baseline of ``source`` for ``engine``: the F16 GGUF or the fp32 checkpoint."""
    if engine == "gguf":
        return zoo.build_variant(source, "F16")
    if source == zoo.REFUSER:
        return refuser.hf_checkpoint()
    return zoo_hf.dequantized_checkpoint(zoo.SOURCE_ALIASES.get(source, source))


def candidate_path(source: str, fmt: str) -> Path:
    """Return the artifact of format ``fmt`` of ``source``, building it once (zoo caches it)."""
    engine = RECIPES[fmt][0]
    if engine == "gguf" or fmt not in HF_ZOO:
        return zoo.build_variant(source, fmt)
    return zoo_hf.quantized_variant(baseline_path(source, "hf"), fmt, stem=source)


def run_cell(cell: Cell, out: Path, threads: int | None, log: Any) -> None:
    """Produce the cell's candidate and screen it against its baseline; fill status, reason and record."""
    started = time.monotonic()
    try:
        # the candidate first: a format the zoo cannot build fails in seconds, before any baseline is built
        cell.candidate = str(candidate_path(cell.source, cell.fmt))
        cell.baseline = str(baseline_path(cell.source, cell.engine))
    except Exception as exc:  # noqa: BLE001 - every failure is a finding of the matrix
        cell.status, cell.reason = "not produced", _reason(exc)
        log(f"{cell.cell_id}: not produced: {cell.reason}")
        if not isinstance(exc, QuantSafeError):
            traceback.print_exc()
        return
    cell.timings["produce_s"] = round(time.monotonic() - started, 1)
    options: dict[str, Any] = {"threads": threads} if threads else {}
    try:
        results = screen_models(cell.baseline, [cell.candidate], policy=load_policy("default"),
                                probes=load_probes(), out_dir=out / cell.source / cell.engine,
                                engine=cell.engine, engine_options=options, progress=False)
    except Exception as exc:  # noqa: BLE001
        cell.status, cell.reason = "not screened", _reason(exc)
        log(f"{cell.cell_id}: not screened: {cell.reason}")
        if not isinstance(exc, QuantSafeError):
            traceback.print_exc()
        return
    finally:
        cell.seconds = round(time.monotonic() - started, 1)
    result = results[0]
    cell.status, cell.record, cell.record_path = "screened", result.record, result.paths.get("record")
    s = result.record["screening"]
    cached = (result.record.get("cache") or {})
    log(f"{cell.cell_id}: {s['band'] or s['status']} RTSI {s['rtsi']} in {cell.seconds} s "
        f"(cache: {json.dumps(cached, sort_keys=True)})")


# --------------------------------------------------------------------------- calibration


def delta_table(cells: list[Cell]) -> str:
    """Return the screened cells as a delta table (the calibrate command's input), one row per measured cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["base_model", "quant", "family", "engine", "refusal_rate_delta",
                     *[f"{f}_delta" for f in FEATURE_NAMES]])
    for cell in cells:
        if cell.record is None or cell.record["screening"]["status"] != "scored":
            continue
        rec = cell.record
        rate = rec["candidate"]["profile"]["refusal_rate"] - rec["baseline"]["profile"]["refusal_rate"]
        writer.writerow([cell.source, cell.fmt, SOURCES[cell.source][1], cell.engine, repr(rate),
                         *[repr(float(rec["screening"]["deltas"][f])) for f in FEATURE_NAMES]])
    return buf.getvalue()


def run_calibrate(table: str, work: Path) -> dict[str, Any]:
    """Return ``quantsafe calibrate --json`` on the delta table (its result, the profile text, its report)."""
    csv_path, yaml_path, report_path = work / "cpu-matrix-deltas.csv", work / "cpu-matrix.yaml", work / "report.json"
    csv_path.write_text(table)
    cmd = [sys.executable, "-m", "pytest_quantsafe.cli", "calibrate", "--input", str(csv_path),
           "--output", str(yaml_path), "--name", "cpu-matrix", "--report", str(report_path), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    out: dict[str, Any] = {"exit_code": proc.returncode, "command": "quantsafe calibrate --input cpu-matrix-deltas.csv "
                           "--output cpu-matrix.yaml --name cpu-matrix --report report.json --json",
                           "document": doc, "stderr": proc.stderr[-2000:], "csv": table}
    if proc.returncode == 0:
        out["yaml"] = yaml_path.read_text()
        out["report"] = json.loads(report_path.read_text())
    return out


def machine() -> str:
    """Return the CPU model, core count, RAM and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        ram = f"{mem / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        ram = "unknown RAM"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {ram}, load average {load}"


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, calibrate on it, print the report (and with --write, replace the docs and profile)."""
    parser = argparse.ArgumentParser(prog="benchmarks/validation_matrix.py")
    parser.add_argument("--out", type=Path, default=Path("quantsafe-validation"), help="records go here")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated zoo sources")
    parser.add_argument("--formats", default=",".join(RECIPES), help="comma-separated formats")
    parser.add_argument("--cells", default="", help="comma-separated source:format cells (instead of "
                        "--sources x --formats)")
    parser.add_argument("--threads", type=int, default=None, help="engine threads")
    parser.add_argument("--write", action="store_true",
                        help="write docs/validation.md and policies/calibration/cpu-matrix.yaml")
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    chosen = {tuple(c.split(":", 1)) for c in args.cells.split(",") if c} or {(s, f) for s in sources for f in formats}
    unknown = [f"{s}:{f}" for s, f in sorted(chosen) if s not in SOURCES or f not in RECIPES]
    if unknown:
        parser.error(f"unknown source or format: {', '.join(unknown)}")
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    machine_start = machine()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.0f} s, load {os.getloadavg()[0]:.1f}] {message}", flush=True)

    cells = [Cell(s, f, RECIPES[f][0], RECIPES[f][1]) for s in SOURCES for f in RECIPES]
    # --cells runs in the order given (the most informative first when time is short); the report keeps
    # the fixed order.
    order = [tuple(c.split(":", 1)) for c in args.cells.split(",") if c] or \
        [(c.source, c.fmt) for c in cells if (c.source, c.fmt) in chosen]
    by_id = {(c.source, c.fmt): c for c in cells}
    for key in order:
        cell = by_id[key]  # type: ignore[index]
        log(f"{cell.cell_id}: producing and screening")
        run_cell(cell, args.out, args.threads, log)
    for cell in cells:
        if cell.status == "pending":
            cell.status, cell.reason = "not run", "left out of this run (--cells / --sources / --formats)"
    with tempfile.TemporaryDirectory() as tmp:
        calibration = run_calibrate(delta_table(cells), Path(tmp))
    from validation_report import finish

    context = {"started": started_at.strftime("%Y-%m-%d %H:%M UTC"), "machine_start": machine_start,
               "machine_end": machine(), "wall_s": round(time.monotonic() - started),
               "argv": " ".join(["benchmarks/validation_matrix.py", *(argv if argv is not None else sys.argv[1:])]),
               "sources": SOURCES, "recipes": RECIPES, "baselines": BASELINES}
    return finish(cells, calibration, context, root=ROOT, write=args.write)


if __name__ == "__main__":
    raise SystemExit(main())
