#!/usr/bin/env bash
# The Action's environment: `venv.sh plan` prints the venv path and cache key (as step
# outputs), `venv.sh install` creates the venv and installs quantsafe with the extras the
# engine and signing need. Inputs arrive only as environment variables (QS_*).
set -euo pipefail
mode="${1:?usage: venv.sh plan|install}"

case "${QS_ENGINE:-auto}" in
  gguf) extras="gguf" ;;
  hf) extras="hf" ;;
  openai) extras="" ;;
  auto) extras="gguf,hf" ;;
  *) echo "::error title=quantsafe input engine::engine must be auto, gguf, hf or openai" >&2; exit 2 ;;
esac
case "${QS_SIGN:-false}" in
  true) extras="${extras:+$extras,}sign" ;;
  false) ;;
  *) echo "::error title=quantsafe input sign::sign must be true or false" >&2; exit 2 ;;
esac

project="${GITHUB_ACTION_PATH:?GITHUB_ACTION_PATH is set by the runner}"
python="${QS_PYTHON:-python3}"
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
constraints="$project/scripts/constraints.txt"
# The key covers the project source itself (metadata, pins and every package file), so an
# @branch ref whose code moved gets a new environment instead of a stale cached one.
source_hash="$(cd "$project" && find pyproject.toml scripts/constraints.txt pytest_quantsafe -type f \
  ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
fingerprint="$(printf '%s|%s|%s|%s' "$source_hash" "$extras" "$pyver" "${QS_LLAMA_CMAKE_ARGS:-}" \
  | sha256sum | cut -c1-16)"
venv="${RUNNER_TOOL_CACHE:-$HOME/.cache}/quantsafe-venv/$fingerprint"

if [ "$mode" = plan ]; then
  {
    echo "venv=$venv"
    echo "key=quantsafe-venv-${RUNNER_OS:-Linux}-${RUNNER_ARCH:-X64}-py$pyver-$fingerprint"
    echo "extras=$extras"
    # The completion cache (engines/cache.py) lives under $QUANTSAFE_CACHE/completions.
    echo "completions=${QUANTSAFE_CACHE:-$HOME/.cache/quantsafe}/completions"
    echo "completions-key=quantsafe-completions-${RUNNER_OS:-Linux}-${RUNNER_ARCH:-X64}-"
  } >> "${GITHUB_OUTPUT:?}"
  exit 0
fi

# The runner image (Dockerfile) ships a ready environment: use it as it is.
pre="${QUANTSAFE_PREINSTALLED:-}"
if [ -n "$pre" ] && "$pre/bin/python" -c 'import pytest_quantsafe' 2>/dev/null; then
  echo "$pre/bin" >> "${GITHUB_PATH:?}"
  echo "python=$pre/bin/python" >> "${GITHUB_OUTPUT:?}"
  exit 0
fi

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.quantsafe-installed" ]; then
  "$python" -m venv "$venv"
  # llama-cpp-python builds from source; on GPU runners QS_LLAMA_CMAKE_ARGS="-DGGML_CUDA=on".
  CMAKE_ARGS="${QS_LLAMA_CMAKE_ARGS:-}" "$venv/bin/python" -m pip install --disable-pip-version-check -q \
    -c "$constraints" "$project${extras:+[$extras]}"
  touch "$venv/.quantsafe-installed"
fi
echo "$venv/bin" >> "${GITHUB_PATH:?}"
echo "python=$venv/bin/python" >> "${GITHUB_OUTPUT:?}"
