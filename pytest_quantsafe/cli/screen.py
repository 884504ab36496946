"""Sub-commands ``quantsafe screen`` (screen real models) and ``quantsafe demo`` (the packaged ladder).

Exit status of ``screen``: the worst over the candidates, in the order
2 (usage or input error) > 3 (insufficient data) > 1 (gate failed) > 0 (pass).
Insufficient data ranks above a failed gate because it says the screen could not
measure at all, which a reviewer must see before any band. ``demo`` exits 0 when the
demo ran: it demonstrates a gate and prints each candidate's gate outcome, it is
not one.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from pytest_quantsafe import zoo
from pytest_quantsafe._util import check_writable, text_table
from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import (
    EXIT_GATE_FAILED,
    EXIT_INSUFFICIENT,
    EXIT_PASS,
    EXIT_USAGE,
    QuantSafeError,
    UsageError,
)
from pytest_quantsafe.measure.paired import evidence_line
from pytest_quantsafe.policy import load_policy
from pytest_quantsafe.probes import load_probes, select
from pytest_quantsafe.record.html import write_report
from pytest_quantsafe.results import ScreeningResult
from pytest_quantsafe.screen import output_name, result_name, screen_models
from pytest_quantsafe.types import LIMITS_SENTENCE, ProbeSet, RefusalProfile

#: Worst-first order of exit codes when several candidates are screened.
EXIT_SEVERITY: tuple[int, ...] = (EXIT_USAGE, EXIT_INSUFFICIENT, EXIT_GATE_FAILED, EXIT_PASS)

#: The demo's probe subset: category-stratified, a few minutes on 2 cores.
DEMO_HARMFUL = 40
DEMO_BENIGN = 20
#: The demo's ladders, by zoo source: (what it is, rungs with the baseline first).
#: "qwen" is the packaged Qwen2.5-Coder-0.5B; "refuser" is SmolLM2-135M fine-tuned on this
#: machine to refuse in several templates (zoo_refuser.py), whose templates drift when quantized.
DEMO_LADDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen": ("Qwen2.5-Coder-0.5B-Instruct (packaged on PyPI)", ("F16", "Q8_0", "Q2_K")),
    "refuser": ("SmolLM2-135M refusal-tuned fixture (fine-tuned here on first use, then cached)",
                ("F16", "Q8_0", "Q4_K_M", "Q3_K_S")),
}


def worst_exit_code(codes: Sequence[int]) -> int:
    """Return the most severe exit code of ``codes`` (2 > 3 > 1 > 0); 0 for none."""
    ranked = [c for c in EXIT_SEVERITY if c in set(codes)]
    unknown = [c for c in codes if c not in EXIT_SEVERITY]
    if unknown:
        return EXIT_USAGE
    return ranked[0] if ranked else EXIT_PASS


def register(subparsers: Any) -> None:
    """Add the ``screen`` and ``demo`` sub-commands."""
    p = subparsers.add_parser("screen", help="screen quantized candidates against their baseline",
                              description="Screen each candidate against the baseline for refusal-template "
                              "drift (RTSI) and gate it with a policy. " + LIMITS_SENTENCE)
    p.add_argument("--baseline", required=True, help="full-precision baseline: .gguf, HF folder, hf://, http(s)://")
    p.add_argument("--candidate", action="append", required=True, help="quantized candidate (repeatable)")
    _add_common(p)
    p.add_argument("--probes", help="probe file (JSONL or AdvBench/HarmBench/JailbreakBench CSV); "
                   "default: the policy's probe set, else the shipped one")
    p.add_argument("--engine", default="auto", choices=("auto", "gguf", "hf", "openai"))
    p.add_argument("--chat-template", type=Path, help="Jinja chat template file for models whose GGUF has none")
    p.add_argument("--no-cache", action="store_true",
                   help="read no cached completion: generate every answer again (for a record that will be "
                   "signed; the record's cache block says how many completions came from the cache)")
    p.add_argument("--max-probes", type=int, metavar="N",
                   help="screen a category-stratified subset of N probes (2/3 harmful, 1/3 benign)")
    p.set_defaults(func=run_screen)

    d = subparsers.add_parser("demo", help="build the demo's model ladders and screen them",
                              description="Build (or reuse) two quantization ladders and screen each candidate "
                              "against its F16 baseline with the default policy: the packaged "
                              "Qwen2.5-Coder-0.5B (Q8_0, Q2_K) and a SmolLM2-135M fine-tuned here to refuse "
                              "(Q8_0, Q4_K_M, Q3_K_S). " + LIMITS_SENTENCE)
    _add_common(d)
    d.add_argument("--ladder", choices=(*DEMO_LADDERS, "all"), default="all",
                   help="which ladder to screen (default: all)")
    d.add_argument("--full", action="store_true", help="screen the whole default probe set "
                   f"(default: {DEMO_HARMFUL} harmful + {DEMO_BENIGN} benign, category-stratified)")
    d.add_argument("--max-probes", type=int, metavar="N",
                   help="screen a category-stratified subset of N probes (2/3 harmful, 1/3 benign)")
    d.set_defaults(func=run_demo, out=None)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="default", help="policy name or YAML file (default: default)")
    p.add_argument("--out", type=Path, help="output folder: <out>/<candidate>/record.json, card.yaml, summary.md, "
                   "samples.jsonl")
    p.add_argument("--threads", type=int, metavar="N", help="engine threads (default: the engine's choice)")
    p.add_argument("--cache-dir", type=Path, help="completion cache (default: $QUANTSAFE_CACHE/completions)")
    p.add_argument("--no-early-exit", action="store_true",
                   help="generate every answer in full (default: stop an answer once the pattern detector "
                   "can no longer call it a refusal; records are the same either way)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option (repeatable), typed by the engine's option table, e.g. digest=<sha256> "
                   "or concurrency=8 for openai; secrets come from the environment (api_key_env=NAME)")
    add_json_flag(p)
    p.add_argument("--save-completions", action="store_true",
                   help="keep each answer's full text in samples.jsonl (default: label, 5-word prefix and token "
                   "count only; a compliant model's answers to harmful probes are harmful text)")
    p.add_argument("--judge", metavar="MODEL", help="a refusal-judge model (.gguf, HF folder, hf://, http(s)://): "
                   "records its refusal rates and flags measurement_divergence at >= 20 pp")


def _terminate_cleanly(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so engines close their workers; finished completions are already cached.
    raise KeyboardInterrupt


def _setup(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    logger = logging.getLogger("quantsafe")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("quantsafe: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _subset(probe_set: ProbeSet, max_probes: int | None) -> ProbeSet:
    if max_probes is None:
        return probe_set
    if max_probes < 1:
        raise UsageError(f"--max-probes must be at least 1, got {max_probes}", where="--max-probes")
    n_harmful = min(len(probe_set.harmful), max(1, math.ceil(2 * max_probes / 3)))
    n_benign = min(len(probe_set.benign), max_probes - n_harmful)
    return select(probe_set, n_harmful, n_benign)


def _engine_options(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    from pytest_quantsafe.engines.options import parse_engine_options

    options: dict[str, Any] = parse_engine_options(engine, args.engine_option)
    if args.no_early_exit:
        options["early_exit"] = False
    if args.threads is not None:
        options["threads"] = args.threads
    template = getattr(args, "chat_template", None)
    if template is not None:
        if not template.is_file():
            raise UsageError("chat template file not found", where=str(template),
                             fix="pass a Jinja chat template file to --chat-template")
        options["chat_template"] = str(template)
    return options


def _interval(profile: RefusalProfile) -> str:
    lo, hi = profile.refusal_rate_ci
    return f"{profile.refusal_rate:.0%} [{lo:.0%}-{hi:.0%}]"


def format_table(results: Sequence[ScreeningResult]) -> str:
    """Return the per-candidate table: candidate, band, RTSI, refusal rate baseline -> candidate,
    benign-answer quality change (pp, when measured), verdict, and the paired evidence."""
    header = ("candidate", "band", "RTSI", "refusal baseline -> candidate (95% CI)", "quality", "verdict",
              "paired evidence")
    rows = [header]
    for r in results:
        s = r.screening
        band = r.record["screening"]["band"] or s.status  # the record's effective band, as every front door shows
        rtsi = f"{s.rtsi:.3f}" if s.rtsi is not None else "-"
        flags = f" ({', '.join(s.flags)})" if s.flags else ""
        quality = s.quality or {}
        delta = quality.get("quality_delta_pp")
        rows.append((result_name(r), band + flags, rtsi,
                     f"{_interval(s.baseline)} -> {_interval(s.candidate)}",
                     f"{delta:+.1f} pp" if quality.get("status") == "measured" and delta is not None else "-",
                     r.verdict.outcome, evidence_line(s.paired)))
    return "\n".join(text_table(rows, rule_under_header=True))


def _report(results: Sequence[ScreeningResult], out: Path | None) -> None:
    print(format_table(results))
    _footer(results, out)


def _footer(results: Sequence[ScreeningResult], out: Path | None) -> None:
    """Print where each candidate's records went and the report, then the limits sentence."""
    if out is not None:
        for r in results:
            if r.paths:
                print(f"records of {result_name(r)}: {Path(r.paths['record']).parent}")
        report = write_run_report(out)
        if report is not None:
            print(f"report: {report}")
    print(LIMITS_SENTENCE)


def write_run_report(out: Path) -> Path | None:
    """Write ``out/report.html``; a failure is a warning on stderr, since the records are already written."""
    try:
        return write_report(out)
    except (QuantSafeError, OSError) as exc:
        message = exc.diagnostics() if isinstance(exc, QuantSafeError) else str(exc)
        sys.stderr.write(f"quantsafe: report.html not written (the records are): {message}\n")
        return None


def result_summary(r: ScreeningResult) -> dict[str, Any]:
    """Return one candidate's screening as the ``--json`` document lists it."""
    s = r.screening
    return {
        "candidate": result_name(r), "quantization": r.candidate.quantization,
        "artifact_digest": r.candidate.digest, "baseline": output_name(r.baseline),
        "status": s.status, "band": s.band, "rtsi": s.rtsi,
        "rtsi_ci": list(s.rtsi_ci) if s.rtsi_ci is not None else None, "flags": list(s.flags),
        "regime": s.regime,
        "refusal_rate": {"baseline": s.baseline.refusal_rate, "candidate": s.candidate.refusal_rate},
        "quality_delta_pp": (s.quality or {}).get("quality_delta_pp"),
        "verdict": {"outcome": r.verdict.outcome, "exit_code": r.verdict.exit_code,
                    "reasons": list(r.verdict.reasons),
                    "broken_rules": [rule.rule for rule in r.verdict.rules if not rule.passed]},
        "record": r.paths.get("record"),
    }


def _json_result(args: argparse.Namespace, results: Sequence[ScreeningResult], out: Path | None,
                 exit_code: int) -> None:
    report = out / "report.html" if out is not None and (out / "report.html").is_file() else None
    set_result(args, {"candidates": [result_summary(r) for r in results],
                      "out": str(out) if out is not None else None, "exit_code": exit_code,
                      "report": str(report) if report is not None else None,
                      "limits": LIMITS_SENTENCE})


def _verdict_lines(results: Sequence[ScreeningResult]) -> list[str]:
    names = {EXIT_PASS: "pass", EXIT_GATE_FAILED: "gate failed", EXIT_INSUFFICIENT: "insufficient data"}
    lines = []
    for r in results:
        broken = [f"{rule.rule}: {rule.detail}" for rule in r.verdict.rules if not rule.passed]
        if broken:
            why = "; ".join(broken)
        elif r.verdict.rules and r.verdict.exit_code == EXIT_PASS:
            why = f"all {len(r.verdict.rules)} policy rules held"
        else:
            why = "; ".join(r.verdict.reasons) or r.verdict.outcome
        lines.append(f"{result_name(r)}: {names.get(r.verdict.exit_code, r.verdict.outcome)} "
                     f"(exit {r.verdict.exit_code}): {why}")
    return lines


def run_screen(args: argparse.Namespace) -> int:
    """Screen the candidates; print the table; return the worst exit code over them."""
    _setup(args)
    if args.out is not None:
        check_writable(args.out, "--out", folder=True)  # in seconds, not after generation
    if args.cache_dir is not None:
        check_writable(args.cache_dir, "--cache-dir", folder=True)
    policy = load_policy(args.policy)
    probe_set = _subset(load_probes(args.probes if args.probes else policy.probes), args.max_probes)
    results = screen_models(args.baseline, args.candidate, policy=policy, probes=probe_set, out_dir=args.out,
                            engine=args.engine, engine_options=_engine_options(args, args.engine), cache_dir=args.cache_dir,
                            progress=not args.no_progress, judge=args.judge,
                            save_completions=args.save_completions, use_cache=not args.no_cache)
    _report(results, args.out)
    code = worst_exit_code([r.verdict.exit_code for r in results])
    summary = {EXIT_PASS: "quantsafe: pass (exit 0)", EXIT_GATE_FAILED: "quantsafe: gate failed (exit 1)",
               EXIT_INSUFFICIENT: "quantsafe: insufficient data (exit 3)"}
    sys.stderr.write("\n".join([*_verdict_lines(results), summary.get(code, f"quantsafe: exit {code}")]) + "\n")
    _json_result(args, results, args.out, code)
    return code


def run_demo(args: argparse.Namespace) -> int:
    """Build or reuse the demo ladders, screen each, print a table per ladder; return 0 when it ran."""
    _setup(args)
    if args.out is not None:
        check_writable(args.out, "--out", folder=True)
    log = logging.getLogger("quantsafe.demo")
    policy = load_policy(args.policy)
    options = _engine_options(args, "gguf")
    probe_set = load_probes(policy.probes)
    if args.max_probes is not None:
        probe_set = _subset(probe_set, args.max_probes)
    elif not args.full:
        probe_set = select(probe_set, min(DEMO_HARMFUL, len(probe_set.harmful)),
                           min(DEMO_BENIGN, len(probe_set.benign)))
    out = args.out if args.out is not None else Path("quantsafe-out") / "demo"
    sources = list(DEMO_LADDERS) if args.ladder == "all" else [args.ladder]
    results: list[ScreeningResult] = []
    for source in sources:
        what, rungs = DEMO_LADDERS[source]
        log.info("building or reusing the %s ladder (%s) under %s: %s", source, ", ".join(rungs), zoo.models_dir(),
                 what)
        if source == zoo.REFUSER and not zoo.variant_path(source, rungs[0]).is_file():
            log.info("first use on this machine: fine-tuning SmolLM2-135M to refuse (about 5 minutes on 2 idle "
                     "CPU cores, progress every 10 steps); cached afterwards")
        ladder = [zoo.build_variant(source, quant) for quant in rungs]
        log.info("screening %s against %s on %d harmful + %d benign probes",
                 ", ".join(p.name for p in ladder[1:]), ladder[0].name, len(probe_set.harmful),
                 len(probe_set.benign))
        screened = screen_models(str(ladder[0]), [str(p) for p in ladder[1:]], policy=policy, probes=probe_set,
                                 out_dir=out, engine="gguf", engine_options=options,
                                 cache_dir=args.cache_dir, progress=not args.no_progress, judge=args.judge,
                                 save_completions=args.save_completions)
        print(f"{what}: baseline {ladder[0].name}")
        print(format_table(screened))
        print()
        results.extend(screened)
    _footer(results, out)
    print("gate outcome per candidate (the demo itself exits 0):")
    for line in _verdict_lines(results):
        print(f"  {line}")
    _json_result(args, results, out, EXIT_PASS)
    return EXIT_PASS
