"""Sub-commands that look at what a screening wrote: ``diff``, ``report``, ``model-card``.

Argument parsing and output only; the work is in record/diff.py, record/html.py and
record/modelcard.py. ``diff`` exits 0 when band and verdict are the same, 1 when either
changed, 2 on bad input (records of different probe sets, families or rungs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import write_atomic
from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import EXIT_GATE_FAILED, EXIT_PASS, InputError
from pytest_quantsafe.record.diff import diff_records, render_diff
from pytest_quantsafe.record.html import REPORT_NAME, render_report
from pytest_quantsafe.record.modelcard import model_card_section
from pytest_quantsafe.record.run import load_run, read_json_record, read_samples


def register(subparsers: Any) -> None:
    """Add the diff, report and model-card sub-commands."""
    d = subparsers.add_parser(
        "diff", help="what changed between two screenings of the same candidate (exit 1 if band or verdict did)",
        description="Compare two records of the same rung on the same probe set (e.g. before and after a "
                    "llama.cpp upgrade or a re-quantization): band, RTSI, features, refusal rates and, with "
                    "samples.jsonl beside both, the probes whose flip class changed. Exit 0 same band and "
                    "verdict, 1 changed, 2 not comparable.")
    d.add_argument("old", type=Path, help="the earlier record.json")
    d.add_argument("new", type=Path, help="the later record.json")
    add_json_flag(d)
    d.set_defaults(func=_diff)

    r = subparsers.add_parser(
        "report", help="(re)build OUT_DIR/report.html from the records of a screening run",
        description="Write a self-contained HTML page (inline CSS and SVG, no network) over every "
                    "OUT_DIR/<candidate>/record.json: the ladder, per-candidate contributions, verdicts, "
                    "identity and, with samples.jsonl, the per-probe table.")
    r.add_argument("out_dir", type=Path, help="the --out folder of a screening")
    r.add_argument("--output", type=Path, help=f"write the page here (default OUT_DIR/{REPORT_NAME})")
    add_json_flag(r)
    r.set_defaults(func=_report)

    m = subparsers.add_parser(
        "model-card", help="print a Hugging Face model-card section (Markdown + YAML front matter) for a run",
        description="Print the front matter (base_model, base_model_relation: quantized) and a Markdown "
                    "section: a table per candidate, the limits sentence, how to verify the signed record. "
                    "Needs huggingface_hub (the hf extra).")
    m.add_argument("out_dir", type=Path, help="the --out folder of a screening")
    m.add_argument("--base-model", help="hub repository id of the baseline (default: from the records)")
    m.add_argument("--output", type=Path, help="write the card here instead of stdout")
    add_json_flag(m)
    m.set_defaults(func=_model_card)


def _diff(args: argparse.Namespace) -> int:
    old, new = read_json_record(args.old), read_json_record(args.new)
    diff = diff_records(old, new, old_samples=read_samples(args.old), new_samples=read_samples(args.new),
                        old_where=str(args.old), new_where=str(args.new))
    sys.stdout.write(render_diff(diff) + "\n")
    set_result(args, diff)
    return EXIT_GATE_FAILED if diff["changed"] else EXIT_PASS


def _report(args: argparse.Namespace) -> int:
    entries = load_run(args.out_dir)
    target = args.output or args.out_dir / REPORT_NAME
    try:
        write_atomic(target, render_report(entries))
    except OSError as exc:
        raise InputError(f"cannot write the report: {exc.strerror or exc}", where=str(target),
                         fix="choose a writable --output path") from None
    sys.stdout.write(f"report: {target} ({len(entries)} candidate(s))\n")
    set_result(args, {"out": str(args.out_dir), "report": str(target),
                      "candidates": [{"candidate": e.name, "band": e.record["screening"].get("band"),
                                      "rtsi": e.record["screening"].get("rtsi")} for e in entries],
                      "n_samples": sum(len(e.samples or []) for e in entries)})
    return EXIT_PASS


def _model_card(args: argparse.Namespace) -> int:
    entries = load_run(args.out_dir)
    section = model_card_section(entries, base_model=args.base_model)
    if not section["base_model_is_repo_id"]:
        sys.stderr.write(f"quantsafe: base_model {section['metadata']['base_model']!r} is not a hub repository id "
                         "(org/name); pass --base-model ORG/NAME for the hub to link it\n")
    if args.output:
        try:
            write_atomic(args.output, section["card"])
        except OSError as exc:
            raise InputError(f"cannot write the card: {exc.strerror or exc}", where=str(args.output),
                             fix="choose a writable --output path") from None
    else:
        sys.stdout.write(section["card"] + "\n")
    set_result(args, {"markdown": section["markdown"], "metadata": section["metadata"], "card": section["card"],
                      "candidates": [e.name for e in entries], "output": str(args.output) if args.output else None})
    return EXIT_PASS
