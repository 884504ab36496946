#!/usr/bin/env bash
# Attaches every record and its bundle to the release, under names unique per candidate.
set -euo pipefail
stage="${RUNNER_TEMP:?}/quantsafe-release"
rm -rf "$stage"
python -m pytest_quantsafe.action stage-release --out "${QUANTSAFE_OUT:?}" --dest "$stage"
gh release upload "${QS_TAG:?}" "$stage"/* --clobber
