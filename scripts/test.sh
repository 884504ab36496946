#!/usr/bin/env bash
# One command: set up (idempotent) and run the whole test suite, slow real-model tests included.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh" test
cd "$root"
set +e
"${QUANTSAFE_VENV:-$root/.venv}/bin/python" -m pytest tests -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests (exit 5); failing on purpose" >&2
  exit 1
fi
exit "$rc"
