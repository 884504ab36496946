#!/usr/bin/env bash
# One command: set up (idempotent) and run the whole test suite, slow real-model tests included.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh" test
cd "$root"
set +e
# Two workers, each given whole test files (a module's fixtures are built once): the engines
# default to half the CPUs, so two workers keep both cores of a 2-core machine busy, and the
# zoo's build locks let them share one model cache. QUANTSAFE_TEST_WORKERS=0 runs in one process.
workers="${QUANTSAFE_TEST_WORKERS:-2}"
"${QUANTSAFE_VENV:-$root/.venv}/bin/python" -m pytest tests -p no:cacheprovider --durations=15 \
  -n "$workers" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests (exit 5); failing on purpose" >&2
  exit 1
fi
exit "$rc"
