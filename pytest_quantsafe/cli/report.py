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

from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import EXIT_GATE_FAILED, EXIT_PASS
from pytest_quantsafe.record.diff import diff_records, render_diff
from pytest_quantsafe.record.run import read_json_record, read_samples


def register(subparsers: Any) -> None:
    """Add the diff sub-command."""
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


def _diff(args: argparse.Namespace) -> int:
    old, new = read_json_record(args.old), read_json_record(args.new)
    diff = diff_records(old, new, old_samples=read_samples(args.old), new_samples=read_samples(args.new),
                        old_where=str(args.old), new_where=str(args.new))
    sys.stdout.write(render_diff(diff) + "\n")
    set_result(args, diff)
    return EXIT_GATE_FAILED if diff["changed"] else EXIT_PASS
