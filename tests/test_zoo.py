"""The model zoo's quantization ladders, built from the real packaged GGUF files."""

from __future__ import annotations

import numpy as np
import pytest

from pytest_quantsafe import zoo
from pytest_quantsafe.engines.llamacpp import read_gguf
from pytest_quantsafe.errors import ModelLoadError
from pytest_quantsafe.zoo import ladder
from pytest_quantsafe.zoo.__main__ import main as zoo_main


def _types(info) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split(":") for item in info.tensor_types.split(","))}


def test_variant_paths_are_keyed_by_source_rung_and_versions():
    f16 = zoo.variant_path("qwen", "F16")
    q2 = zoo.variant_path("qwen2.5-coder-0.5b-q4_k_m", "Q2_K")
    small = zoo.variant_path("smollm2", "Q2_K")
    assert f16.name == "Qwen2.5-Coder-0.5B-Instruct.F16.gguf"
    assert q2.name == "Qwen2.5-Coder-0.5B-Instruct.Q2_K.gguf"
    assert len({f16.parent, q2.parent, small.parent}) == 3
    assert f16.parent.parent == zoo.models_dir() / "variants"
    assert ladder.variant_key("qwen", "Q2_K") == ladder.variant_key("qwen2.5-coder-0.5b-q4_k_m", "Q2_K")


def test_hf_variant_of_a_build_subfolder_is_keyed_by_the_parent_build_record(tmp_path):
    # The refuser keeps its checkpoint in <build>/hf-checkpoint/ and its build record in <build>/:
    # two builds (other recipe or data) must give two variant keys, though the folder names agree.
    import json

    from pytest_quantsafe.zoo import hf as zoo_hf

    records = []
    for recipe in ("full", "smoke"):
        build = tmp_path / recipe
        (build / "hf-checkpoint").mkdir(parents=True)
        (build / zoo_hf.MARKER).write_text(json.dumps({"recipe": recipe}))
        records.append(zoo_hf._source_build(build / "hf-checkpoint"))
    assert records == [{"recipe": "full"}, {"recipe": "smoke"}]
    own = tmp_path / "full" / "hf-checkpoint" / zoo_hf.MARKER
    own.write_text(json.dumps({"recipe": "own"}))  # a checkpoint's own record comes first
    assert zoo_hf._source_build(own.parent) == {"recipe": "own"}
    assert zoo_hf._source_build(tmp_path / "nowhere") == {}


def test_unknown_source_or_rung_is_refused():
    with pytest.raises(ModelLoadError) as info:
        zoo.build_variant("llama-70b", "Q2_K")
    assert "unknown packaged model" in info.value.message and info.value.exit_code == 2
    with pytest.raises(ModelLoadError) as info:
        zoo.build_variant("qwen", "Q1_S")
    assert "unknown ladder rung" in info.value.message and "Q8_0" in info.value.fix


def test_profiles_name_the_rungs_the_suite_and_the_demo_need():
    assert set(zoo.VARIANT_PROFILES["test"]) >= {("qwen", "F16"), ("qwen", "Q8_0"), ("qwen", "Q2_K"),
                                                  ("smollm2", "F16"), ("smollm2", "Q2_K")}
    from pytest_quantsafe.cli.screen import DEMO_LADDERS

    demo_rungs = {(source, quant) for source, (_, rungs) in DEMO_LADDERS.items() for quant in rungs}
    assert set(zoo.VARIANT_PROFILES["demo"]) == demo_rungs
    assert ("qwen", "Q2_K") in demo_rungs and ("refuser", "Q3_K_S") in demo_rungs


@pytest.mark.slow
def test_f16_is_a_faithful_dequantization(smollm2_ladder, smollm2_gguf):
    import gguf

    src, f16 = read_gguf(smollm2_gguf), read_gguf(smollm2_ladder["F16"])
    assert f16.file_type == "F16" and src.file_type == "Q4_1"
    assert set(_types(f16)) == {"F16", "F32"}
    assert sum(_types(f16).values()) == sum(_types(src).values())
    assert (f16.vocab_sha256, f16.chat_template, f16.architecture) == (src.vocab_sha256, src.chat_template,
                                                                         src.architecture)
    a = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(smollm2_ladder["F16"])).tensors}
    name = "blk.0.attn_q.weight"
    want = gguf.quants.dequantize(a[name].data, a[name].tensor_type).astype(np.float16)
    assert b[name].tensor_type.name == "F16"
    assert np.array_equal(np.asarray(b[name].data).reshape(want.shape), want)


@pytest.mark.slow
def test_quantized_rungs_report_their_real_tensor_types(qwen_ladder):
    q8, q2 = read_gguf(qwen_ladder["Q8_0"]), read_gguf(qwen_ladder["Q2_K"])
    assert q8.file_type == "Q8_0" and q2.file_type == "Q2_K"
    assert _types(q8).get("Q8_0", 0) > 100
    # 896-wide rows do not fit 256-element k-quant blocks: "Q2_K" is mostly older types.
    assert _types(q2).get("Q4_0", 0) > 0 and _types(q2).get("Q2_K", 0) < _types(q2).get("Q4_0", 0)
    sizes = {q: p.stat().st_size for q, p in qwen_ladder.items()}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q2_K"]


@pytest.mark.slow
def test_build_variant_reuses_the_cached_file(smollm2_ladder):
    path = smollm2_ladder["Q2_K"]
    before = path.stat()
    again = zoo.build_variant("smollm2", "Q2_K")
    assert again == path
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(path.parent.glob("*.part"))  # atomic writes leave no partial files
    assert zoo_main(["build", "--source", "smollm2", "--quant", "Q2_K"]) == 0
    assert path.stat().st_mtime_ns == before.st_mtime_ns


_BUILD_AND_REPORT = """
import os, sys
from pytest_quantsafe import zoo
path = zoo.build_variant("smollm2", "Q3_K_S")
print(os.stat(path).st_ino)
"""


@pytest.mark.slow
def test_two_processes_sharing_a_cache_build_a_rung_once(tmp_path, smollm2_gguf, monkeypatch):
    """Two processes asking one empty cache for the same rung at once: one builds (F16, then Q3_K_S),
    the other waits on the build lock and gets the same file. Without the lock both would build,
    and the first one's file would be replaced under it by the second one's rename."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / smollm2_gguf.name).symlink_to(smollm2_gguf)
    env = {**os.environ, "QUANTSAFE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_REPORT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    monkeypatch.setenv("QUANTSAFE_CACHE", str(cache))
    final = zoo.variant_path("smollm2", "Q3_K_S")
    assert {int(out.split()[-1]) for out, _ in outs} == {final.stat().st_ino}
    assert not list(cache.rglob("*.part"))
