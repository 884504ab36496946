#!/usr/bin/env bash
# Signs every screening record as an in-toto attestation over the candidate's files:
# keyless with the workflow's OIDC identity (needs `id-token: write`), or with a local
# key when QS_SIGNING_KEY names one (air-gapped runners). A record that cannot be signed
# fails the step; nothing ships half-signed.
set -euo pipefail
while IFS= read -r record; do
  [ -n "$record" ] || continue
  listing="$(python -m pytest_quantsafe.action artifact-files "$record")"
  mapfile -t files <<< "$listing"
  folder="$(dirname "$record")"
  if [ -n "${QS_SIGNING_KEY:-}" ]; then
    quantsafe attest "$record" --artifact "${files[@]}" --key "$QS_SIGNING_KEY" --out "$folder/record.dsse.json"
  else
    trust=()
    if [ -n "${QS_TRUST_CONFIG:-}" ]; then
      trust=(--trust-config "$QS_TRUST_CONFIG")
    fi
    quantsafe attest "$record" --artifact "${files[@]}" --keyless "${trust[@]}" \
      --out "$folder/record.sigstore.json"
  fi
done <<< "${QS_RECORDS:?}"
