"""The GitHub Action's Python side: inputs in, step outputs, step summary and annotations out.

``action.yml`` keeps its shell thin and calls ``python -m pytest_quantsafe.action``:

- ``prepare``: validate the action's inputs (passed as ``QS_*`` environment variables,
  never interpolated into shell text), expand the candidate globs and export the
  ``QUANTSAFE_*`` variables the pytest plugin reads (through ``$GITHUB_ENV``).
- ``report --out DIR``: read every ``DIR/*/record.json`` (docs/architecture.md "Output folder layout"), write
  ``$GITHUB_OUTPUT`` (verdict, band, rtsi and records of the worst candidate),
  ``$GITHUB_STEP_SUMMARY`` (a table per candidate, a Mermaid ``xychart-beta`` chart of
  the four feature contributions, the limits sentence) and ``::error``/``::notice``
  workflow commands; exit 0 pass, 1 gate failed, 3 insufficient data (docs/architecture.md).
- ``bundles --out DIR``: after signing, list the Sigstore bundles as the ``bundles`` output.

Like ``cli.py`` this is an entry point: it is the one place here that prints and
turns a ``QuantSafeError`` into an exit status.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pytest_quantsafe._util import check_writable
from pytest_quantsafe.action.summary import (
    load_record,
    load_records,
    read_junit,
    render_summary,
    worst,
)
from pytest_quantsafe.cli.screen import worst_exit_code
from pytest_quantsafe.engines.options import api_key_variable, parse_engine_options, split_option_list
from pytest_quantsafe.errors import (
    EXIT_GATE_FAILED,
    EXIT_INSUFFICIENT,
    EXIT_PASS,
    EXIT_USAGE,
    OUTCOME_EXIT,
    InputError,
    SigningError,
    UsageError,
    from_exception,
)
from pytest_quantsafe.policy import load_policy
from pytest_quantsafe.types import LIMITS_SENTENCE

ENGINES = ("auto", "gguf", "hf", "openai")
#: Sigstore bundle (keyless) and DSSE envelope (key mode), as `quantsafe attest` writes them.
BUNDLE_SUFFIXES = (".sigstore.json", ".dsse.json")


# --------------------------------------------------------------------------- workflow commands


def escape_data(value: str) -> str:
    """Return ``value`` escaped for the message part of a workflow command."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(value: str) -> str:
    """Return ``value`` escaped for a workflow-command property (also ``:`` and ``,``)."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, *, file: str | None = None, title: str | None = None) -> str:
    """Return one ``::error``/``::warning``/``::notice`` workflow-command line."""
    props = []
    if file:
        props.append(f"file={escape_property(file)}")
    if title:
        props.append(f"title={escape_property(title)}")
    head = f"::{level} {','.join(props)}" if props else f"::{level}"
    return f"{head}::{escape_data(message)}"


def append_file_command(path: str | os.PathLike[str], values: Mapping[str, str]) -> None:
    """Append ``name<<delimiter`` blocks to a ``$GITHUB_OUTPUT``/``$GITHUB_ENV`` file."""
    chunks = []
    for name, value in values.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name):
            raise UsageError(f"invalid output or variable name {name!r}")
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        if delimiter in value:  # pragma: no cover - a random UUID in the value would be an attack
            raise InputError(f"value of {name} contains the heredoc delimiter", where=name)
        chunks.append(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(chunks))


# --------------------------------------------------------------------------- prepare


def _env(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def expand_candidates(text: str, root: Path, what: str = "candidates") -> list[str]:
    """Return the references of a newline list; globs expand (sorted) relative to ``root``."""
    refs: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" in entry or not glob.has_magic(entry):
            refs.append(entry)
            continue
        pattern = entry if os.path.isabs(entry) else str(root / entry)
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise InputError(f"the {what} pattern {entry!r} matches no file",
                             where=f"input {what}, line {lineno}",
                             fix="check the path; globs are relative to the repository checkout")
        refs.extend(m if os.path.isabs(entry) else os.path.relpath(m, root) for m in matches)
    return list(dict.fromkeys(refs))


def prepare(environ: Mapping[str, str], root: Path) -> dict[str, str]:
    """Return the ``QUANTSAFE_*`` variables for the plugin, validated from the ``QS_*`` inputs."""
    baseline = _env(environ, "QS_BASELINE")
    candidates = expand_candidates(environ.get("QS_CANDIDATES", ""), root)
    manifests = expand_candidates(environ.get("QS_MANIFESTS", ""), root, "manifests")
    if not candidates and not manifests:
        raise InputError("no candidates given", where="input candidates",
                         fix="list the quantized artifacts (paths, globs or references), one per line, "
                             "or external-screen manifests under `manifests:`")
    if candidates and not baseline:
        raise InputError("no baseline given", where="input baseline",
                         fix="set `baseline:` to the full-precision model (path or reference)")
    engine = _env(environ, "QS_ENGINE") or "auto"
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}", where="input engine", fix=f"use one of {', '.join(ENGINES)}")
    sign = (_env(environ, "QS_SIGN") or "false").lower()
    if sign not in ("true", "false"):
        raise UsageError(f"sign must be true or false, got {sign!r}", where="input sign")
    policy = _env(environ, "QS_POLICY")
    if policy:
        # Fail here, naming the file, key and line, rather than as a pytest usage error later.
        is_path = "/" in policy or policy.endswith((".yaml", ".yml"))
        load_policy(root / policy if is_path and not os.path.isabs(policy) else policy)
    option_items = split_option_list(environ.get("QS_ENGINE_OPTIONS", ""))
    parse_engine_options(engine, option_items, where="input engine-options")
    if not (out := _env(environ, "QS_OUT")):
        raise UsageError("no output folder given", where="QS_OUT")
    check_writable(out, "input out (QS_OUT)", folder=True).mkdir(parents=True, exist_ok=True)
    env = {
        "QUANTSAFE_ENGINE": engine,
        "QUANTSAFE_OUT": out,
        # The Action signs after the report (failed screenings too), in one place: the
        # plugin itself does not sign inside the Action.
        "QUANTSAFE_SIGN": "false",
    }
    optional = {"QUANTSAFE_BASELINE": baseline, "QUANTSAFE_CANDIDATES": "\n".join(candidates),
                "QUANTSAFE_MANIFEST": "\n".join(manifests), "QUANTSAFE_POLICY": _env(environ, "QS_POLICY"),
                "QUANTSAFE_PROBES": _env(environ, "QS_PROBES"), "QUANTSAFE_ENGINE_OPTIONS": "\n".join(option_items)}
    env.update({key: value for key, value in optional.items() if value})
    return env


def subject_count(env: Mapping[str, str]) -> int:
    """Return how many screenings (candidates plus manifests) the plugin must produce."""
    return sum(len(env.get(key, "").splitlines()) for key in ("QUANTSAFE_CANDIDATES", "QUANTSAFE_MANIFEST"))


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Report:
    """What ``report`` produced: the exit status, the outputs, the summary and the annotations."""

    exit_code: int
    outputs: dict[str, str]
    summary: str
    annotations: list[str]


def _relative(path: str | None, workspace: str | None) -> str | None:
    if path and workspace and os.path.isabs(path):
        try:
            return os.path.relpath(path, workspace) if Path(path).resolve().is_relative_to(
                Path(workspace).resolve()) else path
        except ValueError:
            return path
    return path


def build_report(out_dir: Path, *, expected: int | None = None, pytest_exit: int | None = None,
                 junit_path: Path | None = None, workspace: str | None = None) -> Report:
    """Return the Action's report over ``out_dir``; missing or degenerate evidence never passes."""
    results = load_records(out_dir)
    junit = read_junit(junit_path)
    notes: list[str] = []
    problems: list[str] = []
    missing = max(0, (expected or 0) - len(results))
    for r in results:
        file = _relative(r.artifact_file(), workspace)
        head = f"{r.name}: {r.band or 'insufficient data'}" + (f", RTSI {r.rtsi:.4f}" if r.rtsi is not None else "")
        reasons = "; ".join(r.record["verdict"].get("reasons", []))
        message = f"{head}. {reasons}".strip() + f" ({LIMITS_SENTENCE})"
        if r.outcome == "pass":
            notes.append(annotation("notice", message, file=file, title=f"quantsafe pass: {r.name}"))
        else:
            title = f"quantsafe {'gate failed' if r.outcome == 'fail' else 'insufficient data'}: {r.name}"
            notes.append(annotation("error", message, file=file, title=title))
    code = worst_exit_code([OUTCOME_EXIT[r.outcome] for r in results])
    if not results or missing:
        problems.append(f"{missing or expected or 'the'} candidate(s) produced no screening record in {out_dir}")
        code = worst_exit_code([code, EXIT_INSUFFICIENT])
    if pytest_exit not in (None, 0) and junit_path is not None and junit is None:
        # pytest writes its JUnit XML whenever it runs at all: without it pytest itself did not
        # start (not installed, broken environment); report that, not the missing records.
        problems.insert(0, f"the gate suite could not run: pytest exited {pytest_exit} and wrote no JUnit XML "
                           f"({junit_path}); see the gate step's log")
        code = EXIT_USAGE
    elif pytest_exit not in (None, 0, 1):
        # pytest 2-5: interrupted, internal error, usage error (a bad option, policy or probe
        # file), no tests collected. The gate did not run as configured: a usage/input error.
        problems.append(f"the gate suite could not run (pytest exited {pytest_exit}); see the gate step's log")
        code = worst_exit_code([code, EXIT_USAGE])
    elif pytest_exit == 1 and code == EXIT_PASS:
        # The records say pass but a gate test failed outside them: never report a pass.
        problems.append("the gate suite failed although every record passed; failing closed")
        code = EXIT_GATE_FAILED
    for problem in problems:
        notes.append(annotation("error", problem, title="quantsafe"))
    verdict = {exit_code: outcome for outcome, exit_code in OUTCOME_EXIT.items()}.get(code, "error")
    top = worst(results) if results else None
    outputs = {
        "verdict": verdict,
        "band": (top.band or "") if top else "",
        "rtsi": f"{top.rtsi:.6f}" if top and top.rtsi is not None else "",
        "worst-candidate": top.name if top else "",
        "records": "\n".join(str(r.path) for r in results),
        "exit-code": str(code),
    }
    summary = render_summary(results, missing=missing, junit=junit, problems=problems)
    return Report(exit_code=code, outputs=outputs, summary=summary, annotations=notes)


def find_bundles(out_dir: Path) -> list[tuple[Path, Path | None]]:
    """Return (record, bundle or None) for every record under ``out_dir``."""
    pairs: list[tuple[Path, Path | None]] = []
    for result in load_records(out_dir):
        candidates = [result.path.parent / f"record{suffix}" for suffix in BUNDLE_SUFFIXES]
        for f in result.record["candidate"]["artifact"].get("files") or []:
            candidates += [Path(f"{f['path']}.quantsafe{suffix}") for suffix in BUNDLE_SUFFIXES]
        pairs.append((result.path, next((c for c in candidates if c.is_file()), None)))
    return pairs


def artifact_files(record_path: Path) -> list[str]:
    """Return the candidate artifact files a record names (what its attestation binds)."""
    files = [str(f["path"]) for f in load_record(record_path).record["candidate"]["artifact"].get("files") or []]
    if not files:
        raise InputError("the record names no candidate files to bind a signature to (external evidence)",
                         where=f"{record_path}: candidate.artifact.files",
                         fix="screen the artifact itself, or run the action with sign: false")
    return files


def stage_release(out_dir: Path, dest: Path) -> list[Path]:
    """Return copies of every record and bundle under ``dest``, named per candidate folder.

    Release assets are named by file name, and every record is ``record.json``: the copies
    are ``<candidate>.record.json`` and ``<candidate>.record.sigstore.json``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    for record, bundle in find_bundles(out_dir):
        name = record.parent.name
        staged.append(dest / f"{name}.record.json")
        shutil.copyfile(record, staged[-1])
        if bundle is not None:
            suffix = next(x for x in BUNDLE_SUFFIXES if bundle.name.endswith(x))
            staged.append(dest / f"{name}.record{suffix}")
            shutil.copyfile(bundle, staged[-1])
    if not staged:
        raise InputError("no screening records to attach", where=str(out_dir))
    return staged


# --------------------------------------------------------------------------- entry point


def _write(path: str | None, text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)


def _cmd_prepare(args: argparse.Namespace, out: TextIO) -> int:
    if os.environ.get("QS_API_KEY"):
        # Before anything else is printed: the runner hides the key in every later log line.
        out.write(f"::add-mask::{os.environ['QS_API_KEY']}\n")
        out.flush()
    env = prepare(os.environ, Path(os.environ.get("GITHUB_WORKSPACE") or os.getcwd()))
    key_variable = api_key_variable(env.get("QUANTSAFE_ENGINE", "auto"),
                                    split_option_list(env.get("QUANTSAFE_ENGINE_OPTIONS", "")))
    if os.environ.get("GITHUB_ENV"):
        append_file_command(os.environ["GITHUB_ENV"], env)
    count = subject_count(env)
    if os.environ.get("GITHUB_OUTPUT"):
        append_file_command(os.environ["GITHUB_OUTPUT"], {"out": env["QUANTSAFE_OUT"],
                                                          "candidate-count": str(count),
                                                          "api-key-env": key_variable})
    out.write(f"quantsafe: {count} screening(s), baseline {env.get('QUANTSAFE_BASELINE', '(from manifests)')}, "
              f"engine {env['QUANTSAFE_ENGINE']}\n")
    return EXIT_PASS


def _cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    report = build_report(Path(args.out), expected=args.expect, pytest_exit=args.pytest_exit,
                          junit_path=Path(args.junit) if args.junit else None,
                          workspace=os.environ.get("GITHUB_WORKSPACE"))
    if os.environ.get("GITHUB_OUTPUT"):
        append_file_command(os.environ["GITHUB_OUTPUT"], report.outputs)
    _write(os.environ.get("GITHUB_STEP_SUMMARY"), report.summary)
    out.writelines(line + "\n" for line in report.annotations)
    out.write(f"quantsafe: verdict {report.outputs['verdict']} (exit {report.exit_code}). {LIMITS_SENTENCE}\n")
    return report.exit_code


def _cmd_bundles(args: argparse.Namespace, out: TextIO) -> int:
    pairs = find_bundles(Path(args.out))
    unsigned = [str(record) for record, bundle in pairs if bundle is None]
    if args.require and unsigned:
        raise SigningError(f"{len(unsigned)} record(s) have no Sigstore bundle", where=unsigned[0],
                           fix="check the sign step's log; keyless signing needs `id-token: write`")
    bundles = [str(bundle) for _, bundle in pairs if bundle is not None]
    if os.environ.get("GITHUB_OUTPUT"):
        append_file_command(os.environ["GITHUB_OUTPUT"], {"bundles": "\n".join(bundles)})
    out.write(f"quantsafe: {len(bundles)} bundle(s)\n")
    return EXIT_PASS


def _cmd_artifact_files(args: argparse.Namespace, out: TextIO) -> int:
    out.writelines(f"{path}\n" for path in artifact_files(Path(args.record)))
    return EXIT_PASS


def _cmd_stage_release(args: argparse.Namespace, out: TextIO) -> int:
    staged = stage_release(Path(args.out), Path(args.dest))
    out.write(f"quantsafe: {len(staged)} file(s) staged for the release in {args.dest}\n")
    return EXIT_PASS


def _optional_int(text: str) -> int | None:
    """Return an int, or None for the empty string a skipped step's output gives."""
    return int(text) if text.strip() else None


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m pytest_quantsafe.action``."""
    parser = argparse.ArgumentParser(prog="python -m pytest_quantsafe.action",
                                     description="The GitHub Action's steps (see action.yml).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate the QS_* inputs and export QUANTSAFE_* for the plugin")
    p.set_defaults(func=_cmd_prepare)
    r = sub.add_parser("report", help="write outputs, step summary and annotations from OUT/*/record.json")
    r.add_argument("--out", required=True, help="the gate's output folder")
    r.add_argument("--expect", type=_optional_int, default=None, help="number of candidates that must have a record")
    r.add_argument("--pytest-exit", type=_optional_int, default=None, help="exit status of the gate's pytest run")
    r.add_argument("--junit", default=None, help="the gate's JUnit XML")
    r.set_defaults(func=_cmd_report)
    b = sub.add_parser("bundles", help="list the Sigstore bundles of the records as the `bundles` output")
    b.add_argument("--out", required=True)
    b.add_argument("--require", action="store_true", help="fail (exit 4) when a record has no bundle")
    b.set_defaults(func=_cmd_bundles)
    a = sub.add_parser("artifact-files", help="print the candidate files a record names, one per line")
    a.add_argument("record")
    a.set_defaults(func=_cmd_artifact_files)
    s = sub.add_parser("stage-release", help="copy records and bundles under unique names for a release")
    s.add_argument("--out", required=True)
    s.add_argument("--dest", required=True)
    s.set_defaults(func=_cmd_stage_release)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one Action step and return its exit status."""
    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, stream))
    except Exception as exc:  # noqa: BLE001  # QuantSafeError, or a third-party failure typed here
        error = from_exception(exc, f"action step {args.command}")
        stream.write(annotation("error", error.diagnostics(), title=f"quantsafe {error.code}") + "\n")
        sys.stderr.write(error.diagnostics() + "\n")
        return error.exit_code

