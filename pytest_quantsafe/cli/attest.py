"""Signing sub-commands: attest, verify, keygen.

Argument parsing and output only; the work is in attest.py (statements,
signing) and verify.py (verification). Exit codes: 0 signed / verified,
2 bad input or usage, 4 signing or verification failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pytest_quantsafe._util import check_writable, write_atomic
from pytest_quantsafe.attest import sign as attest
from pytest_quantsafe.attest.sign import generate_key
from pytest_quantsafe.attest.verify import SignerPolicy, verify_keyless, verify_samples, verify_with_key
from pytest_quantsafe.cli.jsonout import add_json_flag, set_result
from pytest_quantsafe.errors import EXIT_PASS, InputError, UsageError, VerificationFailed
from pytest_quantsafe.record.check import check_record
from pytest_quantsafe.record.store import read_record
from pytest_quantsafe.types import LIMITS_SENTENCE


def register(subparsers: Any) -> None:
    """Add the attest, verify and keygen parsers."""
    p = subparsers.add_parser(
        "attest", help="sign a screening record as an in-toto attestation (Sigstore keyless or a local key)",
        description="Sign record.json as an in-toto Statement (subjects: the candidate artifact files; "
                    "predicate: the record). Proof of what was screened and how, not of safety.")
    p.add_argument("record", help="record.json written by `quantsafe screen`")
    p.add_argument("--artifact", nargs="+", required=True, metavar="PATH",
                   help="the candidate artifact file(s) or model directory; must match the record's digests")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--keyless", action="store_true",
                      help="Sigstore keyless signing with the ambient CI identity (GitHub: id-token: write)")
    mode.add_argument("--key", metavar="KEY.pem", help="sign with a local EC P-256 / Ed25519 key (air-gapped)")
    mode.add_argument("--predicate-only", action="store_true",
                      help="write the checked predicate (record + thresholds) unsigned, for actions/attest "
                           "predicate-path (default <artifact>.quantsafe.predicate.json)")
    p.add_argument("--out", metavar="FILE",
                   help="output path (default <artifact>.quantsafe.sigstore.json, key mode .quantsafe.dsse.json)")
    p.add_argument("--trust-config", metavar="FILE",
                   help="Sigstore ClientTrustConfig JSON (default: Sigstore production)")
    p.add_argument("--identity-token", metavar="JWT",
                   help="explicit OIDC token (default: $SIGSTORE_IDENTITY_TOKEN, then ambient detection)")
    add_json_flag(p)
    p.set_defaults(func=_attest)

    v = subparsers.add_parser(
        "verify", help="verify a signed screening record against the artifact, pinned signer and root",
        description="Verify a quantsafe attestation: signature, pinned issuer + identity (or pinned key), "
                    "payload type, predicateType, subject digests and the record's consistency. Exit 4 on "
                    "any verification failure, a missing or unreadable bundle or artifact included; exit 2 "
                    "only for a usage error (no pinned signer, conflicting flags).")
    v.add_argument("bundle", help="<artifact>.quantsafe.sigstore.json (keyless) or .quantsafe.dsse.json (--key)")
    v.add_argument("--artifact", nargs="+", required=True, metavar="PATH",
                   help="the released artifact file(s) or model directory")
    v.add_argument("--key", metavar="PUB.pem", help="key mode: the pinned public key")
    v.add_argument("--issuer", help="pinned OIDC issuer, e.g. https://token.actions.githubusercontent.com")
    v.add_argument("--identity", help="pinned exact signer identity (certificate SAN)")
    v.add_argument("--identity-pattern", metavar="REGEX", help="explicit regex matched against the whole SAN")
    v.add_argument("--repository", metavar="OWNER/NAME", help="pinned GitHub repository")
    v.add_argument("--workflow", metavar="PATH", help="pinned workflow path, e.g. .github/workflows/release.yml")
    v.add_argument("--ref", help="pinned git ref, e.g. refs/heads/main or refs/tags/v1.0")
    v.add_argument("--trusted-root", metavar="FILE",
                   help="pinned Sigstore trusted_root.json (default: the root shipped with sigstore; "
                        "never refreshed over the network)")
    v.add_argument("--samples", metavar="FILE", help="also check this samples.jsonl against the digest the signed "
                   "record holds")
    add_json_flag(v)
    v.set_defaults(func=_verify)

    k = subparsers.add_parser("keygen", help="create a signing key pair for key-mode attestations",
                              description="Write a PKCS#8 private key (mode 0600; encrypted when "
                                          "QUANTSAFE_KEY_PASSWORD is set) and <stem>.pub.pem for verifiers to pin.")
    k.add_argument("--out", required=True, metavar="KEY.pem", help="private key path")
    k.add_argument("--algorithm", choices=("ec-p256", "ed25519"), default="ec-p256")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(func=_keygen)


def _attest(args: argparse.Namespace) -> int:
    typed = read_record(args.record)  # a missing field, wrong type or NaN: InputError naming it (exit 2)
    try:
        check_record(typed, where=args.record)
    except VerificationFailed as exc:  # never sign a record that would not verify
        raise InputError(f"the record is internally inconsistent: {exc.message}", where=exc.where,
                         fix="re-run the screening; do not edit records by hand") from None
    statement = attest.build_statement(typed.to_json())
    attest.check_artifacts_match(statement, args.artifact)
    out = Path(args.out) if args.out else attest.default_output_path(args.artifact, args.record,
                                                                      keyless=bool(args.keyless))
    if args.predicate_only and not args.out:
        out = out.with_name(out.name.replace(attest.ENVELOPE_SUFFIX, ".quantsafe.predicate.json"))
    check_writable(out, "--out", folder=False)  # before signing, which may take a network round trip
    if args.predicate_only:
        text = json.dumps(statement["predicate"], sort_keys=True, indent=2, ensure_ascii=False) + "\n"
        how = "unsigned predicate for actions/attest, predicate-type " + attest.PREDICATE_TYPE
    elif args.keyless:
        token = args.identity_token or os.environ.get("SIGSTORE_IDENTITY_TOKEN") or None
        text = attest.sign_keyless(statement, identity_token=token, trust_config=args.trust_config)
        how = "Sigstore keyless bundle"
    else:
        text = attest.envelope_json(attest.sign_with_key(statement, args.key))
        how = "DSSE envelope signed with a local key"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)
    except OSError as exc:
        raise InputError(f"cannot write the attestation: {exc.strerror or exc}", where=str(out),
                         fix="choose a writable --out path") from None
    sys.stdout.write(f"{'wrote' if args.predicate_only else 'signed'}: {out} ({how})\n")
    for s in statement["subject"]:
        sys.stdout.write(f"  subject: {s['name']} sha256:{s['digest']['sha256']}\n")
    sys.stdout.write(f"  predicateType: {attest.PREDICATE_TYPE}\n  {LIMITS_SENTENCE}\n")
    set_result(args, {"output": str(out), "signed": not args.predicate_only, "how": how,
                      "predicate_type": attest.PREDICATE_TYPE,
                      "subjects": [{"name": s["name"], "sha256": s["digest"]["sha256"]} for s in statement["subject"]],
                      "limits": LIMITS_SENTENCE})
    return EXIT_PASS


def _verify(args: argparse.Namespace) -> int:
    try:
        return _verify_checked(args)
    except InputError as exc:
        # A bundle or artifact that cannot be read is a verification that did not pass: exit 4,
        # as the help says, whichever of the two is missing.
        raise VerificationFailed(exc.message, where=exc.where, fix=exc.fix) from None


def _verify_checked(args: argparse.Namespace) -> int:
    keyless_flags = [args.issuer, args.identity, args.identity_pattern, args.repository, args.workflow, args.ref,
                     args.trusted_root]
    if args.key:
        if any(keyless_flags):
            raise UsageError("--key excludes the keyless pins (--issuer, --identity, ...)", where="--key",
                             fix="verify key-mode envelopes with --key only")
        result = verify_with_key(args.bundle, args.artifact, args.key)
    else:
        if not args.issuer:
            raise UsageError("keyless verification needs a pinned issuer (or --key for key mode)",
                             where="--issuer", fix="e.g. --issuer https://token.actions.githubusercontent.com")
        policy = SignerPolicy(issuer=args.issuer, identity=args.identity, identity_pattern=args.identity_pattern,
                              repository=args.repository, workflow=args.workflow, ref=args.ref)
        result = verify_keyless(args.bundle, args.artifact, policy, trusted_root=args.trusted_root)
    samples = verify_samples(result.record, args.samples) if args.samples else None
    set_result(args, {
        "verified": True, "method": result.method, "identity": result.signer, "issuer": result.issuer,
        "subjects": [{"name": n, "sha256": d} for n, d in result.subjects], "band": result.band,
        "rtsi": result.rtsi, "outcome": result.outcome, "samples_sha256": samples, "limits": LIMITS_SENTENCE})
    label = "keyless Sigstore bundle" if result.method == "keyless" else "DSSE envelope, pinned key"
    lines = [f"verified: quantsafe screening attestation ({label})"]
    if result.method == "keyless":
        lines += [f"  identity: {result.signer}", f"  issuer:   {result.issuer}"]
    else:
        lines += [f"  key id:   {result.signer}"]
    lines += [f"  subject:  {name} sha256:{digest}" for name, digest in result.subjects]
    if samples:
        lines.append(f"  samples:  {args.samples} sha256:{samples} (the digest the signed record holds)")
    rtsi = f"RTSI {result.rtsi:.4f}" if isinstance(result.rtsi, (int, float)) else "no RTSI"
    lines += [f"  band:     {result.band or 'none (insufficient data)'} ({rtsi}), verdict {result.outcome}",
              f"  {LIMITS_SENTENCE}"]
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_PASS


def _keygen(args: argparse.Namespace) -> int:
    info = generate_key(args.out, algorithm=args.algorithm, overwrite=args.force)
    sys.stdout.write(f"private key: {info['private_key']} (keep secret; mode 0600)\n"
                     f"public key:  {info['public_key']} (pin it: quantsafe verify BUNDLE --artifact FILE "
                     f"--key {info['public_key']})\n"
                     f"key id:      {info['key_id']}\n")
    return EXIT_PASS
