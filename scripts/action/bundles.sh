#!/usr/bin/env bash
# Lists the Sigstore bundles as the `bundles` output; with signing on, a record without
# a bundle fails the step (exit 4) instead of shipping unsigned.
set -euo pipefail
args=(--out "${QS_OUT:?}")
if [ "${QS_SIGN:-false}" = true ]; then
  args+=(--require)
fi
python -m pytest_quantsafe.action bundles "${args[@]}"
