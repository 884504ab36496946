"""The Action's pull-request comment: the drafted body, the exact ``gh api`` calls, and a run against a
fake ``gh`` on PATH that records its arguments (a real process boundary), created then updated in place."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_quantsafe.action.comment import (
    FIND_JQ,
    MARKER,
    draft_comment,
    find_args,
    link_line,
    main,
    post_args,
)
from pytest_quantsafe.action.summary import load_records
from pytest_quantsafe.types import LIMITS_SENTENCE

REPO = Path(__file__).resolve().parent.parent
#: A stand-in for the GitHub CLI: records argv, keeps the comments in a JSON file, answers like `gh api`.
FAKE_GH = r'''#!{python}
import json, os, sys
state = os.environ["FAKE_GH_STATE"]
comments = json.load(open(state)) if os.path.exists(state) else []
with open(os.environ["FAKE_GH_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_GH_FAIL"):
    sys.stderr.write("HTTP 403: Resource not accessible by integration\n")
    sys.exit(1)
args = sys.argv[1:]
if "--jq" in args:  # the list call: print the ids whose body starts with the marker, as --jq would
    for c in comments:
        if c["body"].startswith("<!-- quantsafe -->"):
            print(c["id"])
    sys.exit(0)
body = open(args[args.index("-F") + 1].split("=@", 1)[1]).read()
method = args[args.index("--method") + 1]
if method == "POST":
    comments.append({{"id": 100 + len(comments) + 1, "body": body}})
else:
    target = int(args[args.index("--method") + 2].rsplit("/", 1)[1])
    for c in comments:
        if c["id"] == target:
            c["body"] = body
json.dump(comments, open(state, "w"))
print("{{}}")
'''


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    from test_attest import make_record  # real screening records (screen_profiles)

    out = tmp_path_factory.mktemp("out")
    for name, kind in (("m.Q8_0.gguf", "low"), ("m.Q2_K.gguf", "high")):
        (out / name).mkdir()
        (out / name / "record.json").write_text(json.dumps(make_record(smollm2_gguf, kind)), encoding="utf-8")
    return out


@pytest.fixture()
def fake_gh(tmp_path: Path) -> dict[str, Any]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gh = bin_dir / "gh"
    gh.write_text(FAKE_GH.format(python=sys.executable), encoding="utf-8")
    gh.chmod(gh.stat().st_mode | stat.S_IXUSR)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 7}}), encoding="utf-8")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "FAKE_GH_LOG": str(tmp_path / "gh.log"), "FAKE_GH_STATE": str(tmp_path / "comments.json"),
           "GITHUB_EVENT_PATH": str(event), "GITHUB_REPOSITORY": "org/models", "GITHUB_RUN_ID": "42",
           "GITHUB_SERVER_URL": "https://github.com", "GH_TOKEN": "unused-by-the-fake"}
    return {"env": env, "log": tmp_path / "gh.log", "state": tmp_path / "comments.json"}


def _post(out_dir: Path, env: dict[str, str], url: str = "https://github.com/org/models/actions/runs/42/artifacts/9"
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_quantsafe.action.comment", "post", "--out", str(out_dir),
                           "--report-url", url], env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)


def test_drafted_body(out_dir: Path) -> None:
    body = draft_comment(load_records(out_dir), report_url="https://x/artifacts/9", run_url="https://x/runs/42")
    assert body.startswith(MARKER + "\n")
    assert "quantsafe refusal-drift gate: ❌ fail" in body  # the worst candidate decides the headline
    rows = [line for line in body.splitlines() if line.startswith("| m.")]
    assert [r.split(" | ")[0] for r in rows] == ["| m.Q2_K.gguf", "| m.Q8_0.gguf"]
    assert "HIGH" in rows[0] and "LOW" in rows[1]
    assert "[quantsafe report artifact](https://x/artifacts/9)" in body and LIMITS_SENTENCE in body


def test_exact_gh_api_arguments() -> None:
    assert find_args("org/models", 7) == ["gh", "api", "--paginate", "repos/org/models/issues/7/comments", "--jq",
                                          '.[] | select(.body | startswith("<!-- quantsafe -->")) | .id']
    assert FIND_JQ in find_args("o/r", 1)
    assert post_args("org/models", 7, "/t/c.md") == ["gh", "api", "--method", "POST",
                                                     "repos/org/models/issues/7/comments", "-F", "body=@/t/c.md"]
    assert post_args("org/models", 7, "/t/c.md", 101) == ["gh", "api", "--method", "PATCH",
                                                          "repos/org/models/issues/comments/101", "-F", "body=@/t/c.md"]


def test_one_comment_created_then_updated_in_place(out_dir: Path, fake_gh: dict[str, Any]) -> None:
    first = _post(out_dir, fake_gh["env"])
    assert first.returncode == 0 and "comment created" in first.stdout, first.stderr
    second = _post(out_dir, fake_gh["env"], url="https://github.com/org/models/actions/runs/43/artifacts/10")
    assert second.returncode == 0 and "comment updated" in second.stdout, second.stderr
    calls = [json.loads(line) for line in fake_gh["log"].read_text().splitlines()]
    assert [c[:4] for c in calls] == [find_args("org/models", 7)[1:5], ["api", "--method", "POST",
                                      "repos/org/models/issues/7/comments"], find_args("org/models", 7)[1:5],
                                      ["api", "--method", "PATCH", "repos/org/models/issues/comments/101"]]
    comments = json.loads(fake_gh["state"].read_text())
    assert len(comments) == 1 and comments[0]["body"].startswith(MARKER)  # one comment per pull request
    assert "artifacts/10" in comments[0]["body"] and "artifacts/9" not in comments[0]["body"]
    assert "https://github.com/org/models/actions/runs/42" in comments[0]["body"]


def test_outside_a_pull_request_nothing_is_posted(out_dir: Path, fake_gh: dict[str, Any], tmp_path: Path) -> None:
    push = tmp_path / "push.json"
    push.write_text(json.dumps({"ref": "refs/heads/main"}))
    proc = _post(out_dir, {**fake_gh["env"], "GITHUB_EVENT_PATH": str(push)})
    assert proc.returncode == 0 and "comment skipped" in proc.stdout and not fake_gh["log"].exists()


def test_a_failing_gh_is_a_clear_error(out_dir: Path, fake_gh: dict[str, Any]) -> None:
    proc = _post(out_dir, {**fake_gh["env"], "FAKE_GH_FAIL": "1"})
    assert proc.returncode == 2 and "HTTP 403" in proc.stderr and "pull-requests: write" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_link_goes_to_the_step_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert main(["link", "--report-url", "https://x/artifacts/9"]) == 0
    assert summary.read_text() == link_line("https://x/artifacts/9")
