"""The package's layering, read from the source with ``ast`` (docs/architecture.md "Dependency rules").

Every import counts, also those inside functions: a late import hides an edge from the
reader, not from this test.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_quantsafe

PACKAGE_DIR = Path(pytest_quantsafe.__file__).resolve().parent
PACKAGE = "pytest_quantsafe"
REPO = PACKAGE_DIR.parent
MAX_LINES = 400

#: Layers from the bottom up; a module may import its own layer and the ones below, never above.
#: ``score`` sits below ``measure``: the bootstrap interval (measure.confidence) reruns rtsi.score.
#: ``record`` and ``attest`` are one layer: record.check applies the signed thresholds of
#: attest.sign, and attest.verify runs record.check (no module imports back, see the cycle test).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "_util", "errors", "types", "results"),
    ("probes",),
    ("engines",),
    ("score",),
    ("measure",),
    ("policy",),
    ("record", "attest"),
    ("generation", "screen"),
    ("cli", "plugin", "action"),
)
#: Who may import the test/demo model builders: the zoo itself and the ``demo`` command.
ZOO_IMPORTERS = ("pytest_quantsafe.zoo", "pytest_quantsafe.cli.screen")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Return the package modules ``name`` imports anywhere in its source (``from pkg import sub`` -> pkg.sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")} - {name}


GRAPH: dict[str, set[str]] = {name: _imports(name, path) for name, path in MODULES.items()}


def _top(module: str) -> str:
    """Return the first part below the package ("" for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def _layer(module: str) -> int:
    top = _top(module)
    for rank, members in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{module} belongs to no layer: add {top!r} to LAYERS")


def test_the_graph_is_read() -> None:
    assert "pytest_quantsafe.screen" in GRAPH and "pytest_quantsafe.engines.llamacpp._worker" in GRAPH
    assert "pytest_quantsafe.measure.refusal" in GRAPH["pytest_quantsafe.screen"]  # from ...measure import refusal
    assert "pytest_quantsafe.engines.base" in GRAPH["pytest_quantsafe.screen"]  # an import inside a function


def test_nothing_but_the_zoo_and_the_demo_command_imports_the_zoo() -> None:
    offenders = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() for dep in deps
                       if _top(dep) == "zoo" and not name.startswith(ZOO_IMPORTERS))
    assert not offenders, offenders


def test_the_zoo_is_a_leaf_on_the_bottom_layer() -> None:
    """The model builders use only the shared helpers, errors and values, so tests can build without a pipeline."""
    above = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() if _top(name) == "zoo" for dep in deps
                   if _top(dep) != "zoo" and _layer(dep) > 0)
    assert not above, above


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_lower_layers_never_import_higher_ones() -> None:
    upward = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() if _top(name) != "zoo" for dep in deps
                    if _top(dep) != "zoo" and _layer(dep) > _layer(name))
    assert not upward, upward


def test_engines_import_nothing_from_the_stages_above() -> None:
    forbidden = ("measure", "score", "policy", "record", "attest", "screen", "cli", "plugin", "action", "zoo")
    found = sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() if _top(name) == "engines" for dep in deps
                   if _top(dep) in forbidden)
    assert not found, found


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (limit {MAX_LINES} lines): {long}"


def test_the_zoo_command_still_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest_quantsafe.zoo", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m pytest_quantsafe.zoo" in done.stdout and "build" in done.stdout


def test_the_pytest_plugin_entry_point_names_the_plugin_package() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+, the package 3.10+
    section = re.search(r"^\[project\.entry-points\.pytest11\]\n(.*?)(?:^\[|\Z)", pyproject, re.MULTILINE | re.DOTALL)
    assert section is not None, "pyproject.toml declares no pytest11 entry point"
    assert re.findall(r'^(\S+)\s*=\s*"([^"]+)"', section.group(1), re.MULTILINE) == [("quantsafe", "pytest_quantsafe.plugin")]
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    if installed.get("quantsafe") is None:
        pytest.fail("the installed distribution declares no pytest11 entry point 'quantsafe'")
    assert installed["quantsafe"] == "pytest_quantsafe.plugin"
    plugin = importlib.import_module(installed["quantsafe"])
    assert callable(plugin.pytest_addoption) and callable(plugin.pytest_configure)
