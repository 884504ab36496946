"""How much the quantsafe plugin adds to a pytest session that does not use it.

Runs a one-test pytest session in fresh interpreters, alternately with the plugin
loaded (the default, through the pytest11 entry point) and with ``-p no:quantsafe``,
and reports the medians and their difference. Target: < 0.2 s (docs/benchmarks.md).
Also reports the modules the plugin import pulls in beyond pytest's own.

Usage: ``python benchmarks/plugin_overhead.py [--runs 15]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST_FILE = "def test_nothing():\n    assert 1 + 1 == 2\n"
HEAVY = ("torch", "transformers", "llama_cpp", "sigstore", "numpy", "yaml", "jsonschema")


def one_session(folder: Path, with_plugin: bool) -> float:
    """Return the wall time of one pytest session in a fresh interpreter, in seconds."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "test_x.py")]
    if not with_plugin:
        cmd[4:4] = ["-p", "no:quantsafe"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=folder, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pytest failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def imported_by_plugin() -> tuple[float, list[str]]:
    """Return the import time of ``pytest_quantsafe.plugin`` (pytest already imported) and the heavy
    modules it loaded, measured in a fresh interpreter."""
    code = ("import sys, time, pytest; before = set(sys.modules); t = time.perf_counter(); "
            "import pytest_quantsafe.plugin; t = time.perf_counter() - t; "
            f"print(t, *sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {HEAVY!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1:]


def main() -> int:
    """Run the benchmark and print a small report; exit 1 when the target is missed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "test_x.py").write_text(TEST_FILE)
        one_session(folder, True)  # warm the file cache
        with_plugin, without = [], []
        for _ in range(args.runs):
            with_plugin.append(one_session(folder, True))
            without.append(one_session(folder, False))
    med_with, med_without = statistics.median(with_plugin), statistics.median(without)
    overhead = med_with - med_without
    import_times, heavy = [], []
    for _ in range(5):
        seconds, heavy = imported_by_plugin()
        import_times.append(seconds)
    print(f"runs: {args.runs} each, interleaved")
    print(f"pytest session with the plugin:    median {med_with:.3f} s (min {min(with_plugin):.3f})")
    print(f"pytest session without (-p no:):   median {med_without:.3f} s (min {min(without):.3f})")
    print(f"overhead: {overhead * 1000:.0f} ms (target < 200 ms)")
    print(f"import pytest_quantsafe.plugin: median {statistics.median(import_times) * 1000:.1f} ms")
    print(f"heavy modules imported by the plugin: {', '.join(heavy) or 'none'}")
    return 0 if overhead < 0.2 and not heavy else 1


if __name__ == "__main__":
    raise SystemExit(main())
