#!/usr/bin/env bash
# Runs the gate suite through the quantsafe pytest plugin (which reads the QUANTSAFE_*
# variables the prepare step exported). pytest's exit status becomes a step output
# instead of failing the step: the report step turns records + status into the verdict.
set -euo pipefail
out="${QUANTSAFE_OUT:?the prepare step exports QUANTSAFE_OUT}"
# Whitespace-separated, never evaluated: inputs do not reach a shell parser.
read -r -a extra <<< "${QS_EXTRA_ARGS:-}"
# The API key reaches the engine only as an environment variable (prepare masked it).
if [ -n "${QS_API_KEY:-}" ]; then
  export "${QS_API_KEY_ENV:-OPENAI_API_KEY}=$QS_API_KEY"
fi
unset QS_API_KEY
if ! python -c 'import pytest' 2>/dev/null; then
  # pytest is a core dependency of pytest-quantsafe: its absence is a broken environment.
  echo "::error title=quantsafe gate::pytest is not importable by $(command -v python); reinstall pytest-quantsafe" >&2
fi
set +e
python -m pytest "${GITHUB_ACTION_PATH:?}/gate" -p no:cacheprovider \
  --junitxml="$out/junit.xml" "${extra[@]}"
rc=$?
set -e
{
  echo "pytest-exit=$rc"
  echo "junit=$out/junit.xml"
} >> "${GITHUB_OUTPUT:?}"
