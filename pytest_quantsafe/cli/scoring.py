"""Scoring sub-commands: score-csv, calibrate, card, screen-manifest, manifest.

Argument parsing and output only; the work is in ingest.py, validation.py,
calibration.py, render.py and manifest.py. Exit codes: 0 done, 1 self-test
failed, 2 bad input, 3 some cell has insufficient data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pytest_quantsafe import __version__
from pytest_quantsafe._util import check_writable, write_atomic
from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import EXIT_GATE_FAILED, EXIT_INSUFFICIENT, EXIT_PASS, InputError, UsageError
from pytest_quantsafe.record.build import calibration_block, normalize_floats
from pytest_quantsafe.record.manifest import (
    build_request,
    load_request,
    profile_from_json,
    profiles_from_record,
    screen_request,
)
from pytest_quantsafe.record.render import card_data, render_card
from pytest_quantsafe.record.store import read_record
from pytest_quantsafe.score.calibration import (
    calibration_from_mapping,
    dump_calibration,
    load_calibration,
    load_yaml,
)
from pytest_quantsafe.score.fit import calibrate
from pytest_quantsafe.score.ingest import (
    parse_level_csv,
    read_csv_text,
    read_matrix,
    score_level_rows,
    self_test,
)
from pytest_quantsafe.types import LIMITS_SENTENCE, PROTOCOL_ID, sha256_hex


def _check_output(path: str | None) -> None:
    """Raise InputError now when ``--output`` cannot be written (before any work)."""
    if path not in (None, "-"):
        check_writable(path, "--output", folder=False)  # type: ignore[arg-type]


def _write_text(path: str | None, text: str) -> None:
    if path in (None, "-"):
        sys.stdout.write(text)
        return
    target = Path(path)  # type: ignore[arg-type]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Readers (and a failed run) see the old file or the whole new one, never a part.
        write_atomic(target, text)
    except OSError as exc:
        raise InputError(f"cannot write output: {exc.strerror or exc}", where=str(target),
                         fix="choose a writable output path") from None


def _json_text(data: Any) -> str:
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _read_json(path: str, what: str, max_bytes: int | None = None) -> Any:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} not found", where=path, fix="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {what}: {exc.strerror}", where=path, fix="check the path") from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise InputError(f"{what} is {len(raw)} bytes, over the {max_bytes}-byte cap", where=path,
                         fix="send aggregate features only")
    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows (NaN/Infinity)")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=reject)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply", where=path, fix="pass the file quantsafe wrote") from None
    except (UnicodeDecodeError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        raise InputError(f"{what} is not valid JSON: {exc}", where=f"{path}" + (f": line {line}" if line else ""),
                         fix="write strict JSON (no NaN or Infinity) as quantsafe writes it") from None


def _limits() -> str:
    return LIMITS_SENTENCE


# --------------------------------------------------------------------------- score-csv


def _score_csv(args: argparse.Namespace) -> int:
    calibration = load_calibration(args.calibration)
    if args.self_test:
        checks = self_test(calibration)
        for check in checks:
            got = check["got"]
            sys.stdout.write(f"{'ok  ' if check['ok'] else 'FAIL'} {check['cell_id']:<14} "
                             f"{got['status']:<18} {got['band']!s:<9} {','.join(got['flags'])}\n")
        failed = [c for c in checks if not c["ok"]]
        sys.stdout.write(f"self-test: {len(checks) - len(failed)}/{len(checks)} cases as expected\n")
        set_result(args, normalize_floats({"self_test": checks, "n_cases": len(checks), "n_failed": len(failed)}))
        return EXIT_GATE_FAILED if failed else EXIT_PASS
    if not args.input or not (args.output or args.json):
        raise UsageError("score-csv needs --input and --output (or --json, or --self-test)",
                         fix="quantsafe score-csv --input cells.csv --output rtsi.json")
    _check_output(args.output)
    text, raw = read_csv_text(Path(args.input))
    cells = score_level_rows(parse_level_csv(text, args.input), calibration,
                             min_baseline_refusals=args.min_baseline_refusals)
    if not cells:
        raise InputError("the CSV has no non-baseline cells to score", where=args.input,
                         fix="add candidate rows (is_baseline=false) next to each model's baseline")
    bands = {b: sum(1 for c in cells if c["band"] == b) for b in ("LOW", "MODERATE", "HIGH")}
    insufficient = [c for c in cells if c["status"] == "insufficient_data"]
    cal = calibration_block(calibration)
    result = normalize_floats({
        "schema": "quantsafe.score-csv.v1",
        "tool": {"name": "quantsafe", "version": __version__},
        "protocol": PROTOCOL_ID,
        "input": {"path": Path(args.input).name, "sha256": sha256_hex(raw)},
        "calibration": {k: cal[k] for k in ("name", "digest", "is_recalibrated", "loocv_recall", "bands")},
        "cells": cells,
        "summary": {"n_cells": len(cells), "bands": bands, "insufficient_data": len(insufficient)},
        "limits": _limits(),
    })
    if args.output:
        _write_text(args.output, _json_text(result))
    set_result(args, result)
    sys.stderr.write(f"scored {len(cells)} cells: LOW {bands['LOW']}, MODERATE {bands['MODERATE']}, "
                     f"HIGH {bands['HIGH']}, insufficient_data {len(insufficient)} -> {args.output}\n")
    for cell in insufficient:
        flags = [f for f in cell["flags"] if f != "insufficient_data"]
        sys.stderr.write(f"  insufficient_data: {cell['cell_id']} (line {cell['line']}): {', '.join(flags)}\n"
                         f"  where: {args.input}: line {cell['line']}\n")
        if any(f.startswith("implausible:") for f in flags):
            sys.stderr.write("  fix:   correct the implausible value (shares and rates in [0, 1], counts whole, "
                             "mean refusal length at most 100000 tokens)\n")
    sys.stderr.write(_limits() + "\n")
    return EXIT_INSUFFICIENT if insufficient else EXIT_PASS


# --------------------------------------------------------------------------- calibrate


def _calibrate(args: argparse.Namespace) -> int:
    check_writable(args.output, "--output", folder=False)
    rows, raw = read_matrix(Path(args.input))
    name = args.name or Path(args.output).stem
    cal, report = calibrate(rows, source_sha256=sha256_hex(raw), name=name)
    prov = dict(cal.provenance)
    prov["family_auc"] = normalize_floats(report["family_auc"]["pooled_auc"])
    prov["table3"] = normalize_floats([{k: t[k] for k in ("screen", "routed", "danger_total", "low_bucket")}
                                       for t in report["table3"]])
    import dataclasses

    cal = dataclasses.replace(cal, provenance=prov)
    text = dump_calibration(cal)
    # Validate first, write after: a profile that would not load back never replaces a good one.
    data, root = load_yaml(text, args.output, "calibration profile")
    calibration_from_mapping(data, source=args.output, root=root)
    if args.report:
        check_writable(args.report, "--report", folder=False)
    _write_text(args.output, text)
    if args.report:
        _write_text(args.report, _json_text(normalize_floats(report)))
    out = sys.stdout
    out.write(f"calibrated on {report['n_rows']} rows ({args.input}); danger labels: {report['danger_labels']}\n")
    out.write("feature                 |r|      weight   range [lo, hi]\n")
    for f, w in report["weights"].items():
        lo, hi = report["ranges"][f]
        out.write(f"{f:<23} {report['abs_pearson_r'][f]:.4f}   {w:.4f}   [{lo:.6g}, {hi:.6g}]\n")
    loo = report["loocv"]
    out.write(f"LOOCV: {loo['recall']} danger rows kept out of LOW; LOW bucket {loo['low_bucket']}/{loo['n_rows']}\n")
    auc = report["family_auc"]["pooled_auc"]
    out.write(f"leave-one-family-out ROC AUC: {'n/a' if auc is None else f'{auc:.4f}'} "
              f"over {report['family_auc']['n_families']} families\n")
    out.write("Table 3 (matched LOW bucket):\n")
    for t in report["table3"]:
        out.write(f"  {t['screen']:<29} routed {t['routed']}/{t['danger_total']}  "
                  f"LOW {t['low_bucket']}/{t['n_rows']}\n")
    out.write(f"wrote {args.output} (is_recalibrated: true)\n{_limits()}\n")
    set_result(args, normalize_floats({
        "output": args.output, "name": cal.name, "n_rows": report["n_rows"], "weights": report["weights"],
        "ranges": report["ranges"], "loocv": report["loocv"], "family_auc": report["family_auc"],
        "table3": report["table3"], "is_recalibrated": True, "limits": _limits()}))
    return EXIT_PASS


# --------------------------------------------------------------------------- card


def _card(args: argparse.Namespace) -> int:
    _check_output(args.output)
    record = read_record(args.record)  # a missing field, wrong type or NaN: InputError naming it (exit 2)
    text = render_card(record, source=args.record)
    if args.output or not args.json:
        _write_text(args.output, text)
    set_result(args, {"record": args.record, "output": args.output, "card": normalize_floats(card_data(record)),
                      "yaml": text})
    return EXIT_PASS


# --------------------------------------------------------------------------- manifest


def _screen_manifest(args: argparse.Namespace) -> int:
    _check_output(args.output)
    response = screen_request(load_request(Path(args.request)), load_calibration(args.calibration))
    if args.output or not args.json:
        _write_text(args.output, _json_text(response))
    set_result(args, response)
    sys.stderr.write(f"provisional, unsigned: {response['status']} "
                     f"{response['classification'] or ''} RTSI "
                     f"{'n/a' if response['rtsi'] is None else round(response['rtsi'], 4)}\n{_limits()}\n")
    return EXIT_INSUFFICIENT if response["status"] == "insufficient_data" else EXIT_PASS


def _manifest(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if args.record:
        baseline, candidate, probe = profiles_from_record(read_record(args.record).to_json(), args.record)
        count, digest = args.probe_count or probe[0], args.probe_sha256 or probe[1]
    else:
        if not (args.baseline and args.candidate):
            raise UsageError("manifest needs --record, or --baseline and --candidate profile files",
                             fix="quantsafe manifest --record record.json --output request.json")
        baseline = profile_from_json(_read_json(args.baseline, "baseline profile"), args.baseline)
        candidate = profile_from_json(_read_json(args.candidate, "candidate profile"), args.candidate)
        count, digest = args.probe_count, args.probe_sha256
    request = build_request(
        baseline, candidate, source_model_id=args.source_model_id, probe_count=count, probe_sha256=digest,
        baseline_side={"repo_id": args.baseline_repo, "revision": args.baseline_revision,
                       "quantization": args.baseline_quantization},
        candidate_side={"repo_id": args.candidate_repo, "revision": args.candidate_revision,
                        "quantization": args.candidate_quantization},
    )
    _write_text(args.output, _json_text(request))
    return EXIT_PASS


def register(subparsers: Any) -> None:
    """Add score-csv, calibrate, card, screen-manifest and manifest to the CLI."""
    p = subparsers.add_parser("score-csv", help="score an A.10 per-cell feature CSV against per-model baselines")
    p.add_argument("--input", help="CSV: cell_id, is_baseline, the four features, optional counts/family")
    p.add_argument("--output", help="per-cell JSON result ('-' for stdout)")
    p.add_argument("--calibration", default="default", help="calibration profile name or YAML path")
    p.add_argument("--min-baseline-refusals", type=int, default=1, help="fewer baseline refusals: insufficient")
    p.add_argument("--self-test", action="store_true", help="score the built-in LOW/MODERATE/HIGH/... cases")
    add_json_flag(p)
    p.set_defaults(func=_score_csv)

    p = subparsers.add_parser("calibrate", help="fit RTSI weights and ranges on a matrix; LOOCV, AUC, Table 3")
    p.add_argument("--input", required=True, help="delta table (like rtsi_table.csv) or an A.10 CSV")
    p.add_argument("--output", required=True, help="calibration profile YAML to write")
    p.add_argument("--name", help="profile name (default: the output file's stem)")
    p.add_argument("--report", help="also write the validation report as JSON")
    add_json_flag(p)
    p.set_defaults(func=_calibrate)

    p = subparsers.add_parser("card", help="print the A.9 reporting card (YAML) of a screening record")
    p.add_argument("record", help="record.json")
    p.add_argument("--output", help="write the card here instead of stdout")
    add_json_flag(p)
    p.set_defaults(func=_card)

    p = subparsers.add_parser("screen-manifest", help="screen an external-screen request (aggregate features)")
    p.add_argument("request", help="request JSON (quantsafe.external-screen.v1)")
    p.add_argument("--calibration", default="default", help="calibration profile name or YAML path")
    p.add_argument("--output", help="write the response here instead of stdout")
    add_json_flag(p)
    p.set_defaults(func=_screen_manifest)

    p = subparsers.add_parser("manifest", help="write an external-screen request from two profiles or a record")
    p.add_argument("--record", help="take both profiles and the probe set from this record.json")
    p.add_argument("--baseline", help="baseline RefusalProfile JSON")
    p.add_argument("--candidate", help="candidate RefusalProfile JSON")
    p.add_argument("--source-model-id", required=True, help="common source model of both sides")
    p.add_argument("--probe-count", type=int, help="number of probes (default: from the record)")
    p.add_argument("--probe-sha256", help="probe-set sha256 (default: from the record)")
    for side in ("baseline", "candidate"):
        p.add_argument(f"--{side}-repo", required=True, help=f"{side} model identifier")
        p.add_argument(f"--{side}-revision", required=True, help=f"{side} 40-hex revision")
        p.add_argument(f"--{side}-quantization", required=True, help=f"{side} quantization label")
    p.add_argument("--output", help="write the request here instead of stdout")
    p.set_defaults(func=_manifest)
