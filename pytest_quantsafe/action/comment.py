"""The Action's pull-request comment and report link (``python -m pytest_quantsafe.action.comment``).

- ``post --out DIR [--report-url URL]``: draft one comment (candidate table, link to the
  report artifact, the limits sentence) and post it with ``gh api``; a second run on the
  same pull request updates that comment in place, found by the hidden marker
  ``<!-- quantsafe -->`` its body starts with. Needs ``gh`` on the runner (GitHub's hosted
  runners have it; install it on self-hosted ones), ``GH_TOKEN`` and ``pull-requests: write``.
- ``link --report-url URL``: append the report artifact's link to the step summary.

Opt-in through the action's ``comment: true`` input (docs/action.md). Like the rest of
``action/`` this is an entry point: it prints and turns a ``QuantSafeError`` into an exit
status (docs/architecture.md "Front doors").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pytest_quantsafe.action.summary import BAND_EMOJI, OUTCOME_EMOJI, CandidateResult, load_records, worst
from pytest_quantsafe.errors import EXIT_PASS, InputError, QuantSafeError, UsageError
from pytest_quantsafe.types import LIMITS_SENTENCE

MARKER = "<!-- quantsafe -->"
#: ``--jq`` filter printing the id of each earlier quantsafe comment (its body starts with the marker).
FIND_JQ = f'.[] | select(.body | startswith("{MARKER}")) | .id'


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def draft_comment(results: Sequence[CandidateResult], *, report_url: str | None = None,
                  run_url: str | None = None) -> str:
    """Return the comment body: marker, overall verdict, one row per candidate, the report link, limits."""
    if not results:
        raise InputError("no screening records to comment on", fix="check the gate step: no candidate was screened")
    top = worst(results)
    lines = [MARKER, f"### quantsafe refusal-drift gate: {OUTCOME_EMOJI[top.outcome]} {top.outcome}", "",
             "| candidate | band | RTSI | harmful refusal rate | verdict |", "|---|---|---:|---|---|"]
    for r in results:
        profile = r.record["candidate"]["profile"]
        rtsi = "–" if r.rtsi is None else f"{r.rtsi:.4f}"
        lines.append(f"| {_cell(r.name)} | {BAND_EMOJI[r.band]} {r.band or 'insufficient'} | {rtsi} | "
                     f"{100 * profile['refusal_rate']:.1f}% | {OUTCOME_EMOJI[r.outcome]} {r.outcome} |")
    lines.append("")
    if report_url:
        lines.append(f"HTML report (ladder charts, per-candidate contributions, per-probe table): "
                     f"[quantsafe report artifact]({report_url}) — `report.html` inside.")
    if run_url:
        lines.append(f"Workflow run: {run_url}")
    lines += ["", f"<sub>{LIMITS_SENTENCE}</sub>", ""]
    return "\n".join(lines)


def find_args(repo: str, number: int) -> list[str]:
    """Return the ``gh`` arguments that list the ids of earlier quantsafe comments on the pull request."""
    return ["gh", "api", "--paginate", f"repos/{repo}/issues/{number}/comments", "--jq", FIND_JQ]


def post_args(repo: str, number: int, body_file: str, comment_id: int | None = None) -> list[str]:
    """Return the ``gh`` arguments that create the comment, or update comment ``comment_id`` in place."""
    if comment_id is None:
        return ["gh", "api", "--method", "POST", f"repos/{repo}/issues/{number}/comments", "-F", f"body=@{body_file}"]
    return ["gh", "api", "--method", "PATCH", f"repos/{repo}/issues/comments/{comment_id}", "-F",
            f"body=@{body_file}"]


def pull_request_number(environ: Mapping[str, str]) -> int | None:
    """Return the pull request's number from the event payload, or None outside a pull-request event."""
    path = environ.get("GITHUB_EVENT_PATH")
    if not path or not Path(path).is_file():
        return None
    try:
        event = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the event payload: {exc}", where=path) from None
    number = (event.get("pull_request") or {}).get("number") if isinstance(event, dict) else None
    return int(number) if isinstance(number, int) else None


def _gh(args: list[str]) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise UsageError("the gh command is not on this runner", where="gh",
                         fix="install the GitHub CLI on self-hosted runners, or set comment: false") from None
    if proc.returncode != 0:
        raise UsageError(f"gh api failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}",
                         where=" ".join(args[:5]), fix="give the job pull-requests: write and GH_TOKEN")
    return proc.stdout


def post_comment(out_dir: Path, environ: Mapping[str, str], *, report_url: str | None = None) -> str:
    """Post or update the comment; return ``created``, ``updated`` or ``skipped`` (not a pull request)."""
    number = pull_request_number(environ)
    repo = environ.get("GITHUB_REPOSITORY")
    if number is None or not repo:
        return "skipped"
    server = environ.get("GITHUB_SERVER_URL", "https://github.com")
    run_url = f"{server}/{repo}/actions/runs/{environ['GITHUB_RUN_ID']}" if environ.get("GITHUB_RUN_ID") else None
    body = draft_comment(load_records(out_dir), report_url=report_url or None, run_url=run_url)
    ids = [int(line) for line in _gh(find_args(repo, number)).split() if line.strip().isdigit()]
    with tempfile.TemporaryDirectory() as tmp:
        body_file = str(Path(tmp) / "comment.md")
        Path(body_file).write_text(body, encoding="utf-8")
        _gh(post_args(repo, number, body_file, ids[0] if ids else None))
    return "updated" if ids else "created"


def link_line(report_url: str) -> str:
    """Return the step-summary line that links the report artifact."""
    return f"\n**HTML report:** [quantsafe report artifact]({report_url}) (`report.html` inside)\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``post`` or ``link``; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pytest_quantsafe.action.comment")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("post", help="post or update the pull-request comment")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--report-url", default="")
    k = sub.add_parser("link", help="append the report artifact's link to the step summary")
    k.add_argument("--report-url", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "post":
            print(f"quantsafe: pull-request comment {post_comment(args.out, os.environ, report_url=args.report_url)}")
        elif args.report_url and os.environ.get("GITHUB_STEP_SUMMARY"):
            with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as fh:
                fh.write(link_line(args.report_url))
    except QuantSafeError as exc:
        print(f"::error title=quantsafe comment::{exc.message}", file=sys.stdout)
        sys.stderr.write(exc.diagnostics() + "\n")
        return exc.exit_code
    return EXIT_PASS


if __name__ == "__main__":
    raise SystemExit(main())
