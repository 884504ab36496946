"""Shared checks of the bad-input suite: exit code, no traceback, where + fix named, outputs untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pytest_quantsafe.cli import main

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, str]:
    """Return {relative path: sha256} of every file under ``folder``."""
    out: dict[str, str] = {}
    if folder.exists():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(capsys: pytest.CaptureFixture[str], argv: Sequence[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr). A SystemExit from argparse counts."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(argv: Sequence[str], env: dict[str, str] | None = None,
                   module: str = "pytest_quantsafe.cli") -> tuple[int, str, str]:
    """Run ``python -m module argv`` from the worktree; return (exit status, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=300, check=False,
                          env=full_env, cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused(code: int, err: str, expected: int, *, names: Sequence[str] = (),
                   fix: bool = True) -> None:
    """Assert the documented exit code, no traceback, and that stderr names each of ``names`` and a fix."""
    assert code == expected, f"exit {code}, expected {expected}; stderr:\n{err[-3000:]}"
    assert "Traceback (most recent call last)" not in err, err[-3000:]
    for name in names:
        assert name in err, f"stderr does not name {name!r}:\n{err[-3000:]}"
    if fix:
        assert "fix:" in err or "error[usage]" in err, f"stderr names no fix:\n{err[-3000:]}"


def check_case(capsys: pytest.CaptureFixture[str], outputs: Path, argv: Sequence[str], expected: int,
               names: Sequence[str] = (), fix: bool = True,
               before: Callable[[], None] | None = None) -> str:
    """Run one bad input through the CLI and assert everything the suite promises; return stderr."""
    if before is not None:
        before()
    was = snapshot(outputs)
    code, _out, err = run_cli(capsys, argv)
    assert_refused(code, err, expected, names=names, fix=fix)
    assert snapshot(outputs) == was, "a pre-existing output file changed"
    return err
