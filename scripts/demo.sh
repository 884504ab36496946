#!/usr/bin/env bash
# One command: set up (idempotent) and run a demo screening on the packaged default model.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh" demo
exec "${QUANTSAFE_VENV:-$root/.venv}/bin/quantsafe" demo "$@"
