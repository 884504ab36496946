"""Verification of signed screening records (keyless Sigstore bundles and key-mode DSSE).

Sigstore checks the certificate chain, the transparency log and the signature;
it does not know what we signed. So after the signature and the pinned signer
(OIDC issuer + identity, or the pinned public key) this module checks itself:
the payload type, our predicateType, every subject digest against the files
given, and the record's internal consistency (the band matches RTSI and the
bands; the verdict matches the policy). Any failure is ``VerificationFailed``
(exit code 4) with the reason.

A verified record proves what was screened and how, not that the model is safe.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_quantsafe.attest.identity import GITHUB_ISSUER, SignerPolicy, cert_issuer, cert_sans
from pytest_quantsafe.attest.sign import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    key_id,
    pae,
    subjects_from_paths,
    subjects_from_record,
)
from pytest_quantsafe.errors import InputError, UsageError
from pytest_quantsafe.record.check import check_record, fail_verification

__all__ = ["GITHUB_ISSUER", "SignerPolicy", "VerifiedAttestation", "check_record", "check_statement",
           "verify_artifact_signature", "verify_keyless", "verify_with_key"]

@dataclass(frozen=True)
class VerifiedAttestation:
    """What a successful verification established (and only that)."""

    method: str                       # "keyless" or "key"
    signer: str                       # certificate SAN (keyless) or pinned key id (key mode)
    issuer: str | None                # OIDC issuer (keyless), None in key mode
    subjects: tuple[tuple[str, str], ...]  # (name, sha256)
    band: str | None
    rtsi: float | None
    outcome: str
    statement: Mapping[str, Any]

    @property
    def record(self) -> Mapping[str, Any]:
        """Return the screening record (the predicate)."""
        return self.statement["predicate"]  # type: ignore[no-any-return]


def check_statement(payload_type: str, payload: bytes, artifacts: Sequence[str | Path],
                    where: str) -> dict[str, Any]:
    """Return the statement after checking type, predicateType, subjects vs files, and the record."""
    if payload_type != PAYLOAD_TYPE:
        raise fail_verification(f"payload type {payload_type!r} is not {PAYLOAD_TYPE}", f"{where}: payloadType")
    try:
        statement = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail_verification(f"the signed payload is not JSON: {exc}", f"{where}: payload") from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise fail_verification(f"the payload is not an in-toto Statement v1 ({STATEMENT_TYPE})", f"{where}: payload._type")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise fail_verification(f"predicateType {statement.get('predicateType')!r} is not {PREDICATE_TYPE}",
                    f"{where}: payload.predicateType")
    signed = statement.get("subject")
    if not isinstance(signed, list) or not signed:
        raise fail_verification("the statement has no subjects", f"{where}: payload.subject")
    pairs = []
    for i, s in enumerate(signed):
        sha = s.get("digest", {}).get("sha256") if isinstance(s, dict) and isinstance(s.get("digest"), dict) else None
        if not isinstance(sha, str):
            raise fail_verification("subject without a sha256 digest", f"{where}: payload.subject[{i}]")
        pairs.append((str(s.get("name", "")), sha))
    record = statement.get("predicate")
    check_record(record, f"{where}: predicate", signed_thresholds=True)
    assert isinstance(record, Mapping)  # check_record raised otherwise
    try:
        from_record = {s["digest"]["sha256"] for s in subjects_from_record(record)}
    except InputError as exc:
        raise fail_verification(exc.message, f"{where}: predicate.candidate.artifact.files") from None
    if {d for _, d in pairs} != from_record or len(pairs) != len(from_record):
        raise fail_verification("the subjects are not exactly the record's candidate artifact files",
                    f"{where}: payload.subject")
    if not artifacts:
        raise UsageError("no artifact given to check the subjects against", where="--artifact",
                         fix="pass the released artifact file(s) or model directory")
    given = {s["digest"]["sha256"]: s["name"] for s in subjects_from_paths(artifacts)}
    for name, digest in pairs:
        if digest not in given:
            raise fail_verification(f"subject {name} (sha256 {digest[:16]}…) matches none of the given files",
                        f"{where}: payload.subject")
    unsigned = sorted(n for d, n in given.items() if d not in {d for _, d in pairs})
    if unsigned:
        raise fail_verification(f"given file(s) not covered by the attestation: {', '.join(unsigned)}", "--artifact")
    return statement


def _summary(method: str, signer: str, issuer: str | None, statement: Mapping[str, Any]) -> VerifiedAttestation:
    screening = statement["predicate"]["screening"]
    return VerifiedAttestation(
        method=method, signer=signer, issuer=issuer,
        subjects=tuple((str(s.get("name", "")), s["digest"]["sha256"]) for s in statement["subject"]),
        band=screening.get("band"), rtsi=screening.get("rtsi"),
        outcome=statement["predicate"]["verdict"]["outcome"], statement=statement)


# --------------------------------------------------------------------------- keyless


def _read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail_verification(f"cannot read the {what}: {exc}", str(path), fix=f"give the {what} file") from None


def _load_bundle(path: str | Path, *, want_dsse: bool) -> Any:
    from sigstore.models import Bundle

    text = _read_text(path, "bundle")
    try:
        has_dsse = "dsseEnvelope" in json.loads(text)
        bundle = Bundle.from_json(text)
    except Exception as exc:  # noqa: BLE001 - truncated JSON, bad base64, unknown media type: all unverifiable
        raise fail_verification(f"not a valid Sigstore bundle: {type(exc).__name__}: {str(exc)[:200]}", str(path)) from None
    if want_dsse and not has_dsse:
        raise fail_verification("the bundle holds no DSSE envelope (not a quantsafe attestation)", str(path))
    return bundle


def _trusted_root(path: str | Path | None) -> Any:
    from sigstore.models import ClientTrustConfig, TrustedRoot

    try:
        if path is None:
            # The root shipped with sigstore, never refreshed over the network here.
            return ClientTrustConfig.production(offline=True).trusted_root
        return TrustedRoot.from_file(str(path))
    except OSError as exc:
        raise fail_verification(f"cannot read the trusted root: {exc.strerror or exc}", str(path),
                    fix="give a Sigstore trusted_root.json with --trusted-root") from None
    except Exception as exc:  # noqa: BLE001 - sigstore_models validation errors have no common base
        raise fail_verification(f"invalid trusted root: {type(exc).__name__}: {str(exc)[:200]}", str(path),
                    fix="give a Sigstore trusted_root.json with --trusted-root") from None


def _sigstore_verify(call: Any, where: str) -> Any:
    from sigstore.errors import Error as SigstoreError

    try:
        return call()
    except SigstoreError as exc:
        raise fail_verification(f"signature verification failed: {exc}", where) from None
    except Exception as exc:  # noqa: BLE001 - a malformed bundle can surface as any parsing error
        raise fail_verification(f"signature verification failed: {type(exc).__name__}: {str(exc)[:200]}", where) from None


def verify_keyless(bundle_path: str | Path, artifacts: Sequence[str | Path], signer: SignerPolicy,
                   trusted_root: str | Path | None = None) -> VerifiedAttestation:
    """Return what a keyless Sigstore bundle attests, after every check passed; raise VerificationFailed."""
    from sigstore.verify import Verifier

    signer.validate()
    bundle = _load_bundle(bundle_path, want_dsse=True)
    verifier = Verifier(trusted_root=_trusted_root(trusted_root))
    where = str(bundle_path)
    payload_type, payload = _sigstore_verify(lambda: verifier.verify_dsse(bundle, signer.to_sigstore()), where)
    statement = check_statement(payload_type, payload, artifacts, where)
    cert = bundle.signing_certificate
    sans = cert_sans(cert)
    exact = signer.expected_identity()
    identity = exact if exact in sans else (sans[0] if sans else "")
    return _summary("keyless", identity, cert_issuer(cert), statement)


def verify_artifact_signature(bundle_path: str | Path, artifact: str | Path, signer: SignerPolicy,
                              trusted_root: str | Path | None = None) -> str:
    """Return the signer SAN of a plain Sigstore artifact bundle (hashedrekord) over ``artifact``."""
    from sigstore.verify import Verifier

    signer.validate()
    bundle = _load_bundle(bundle_path, want_dsse=False)
    verifier = Verifier(trusted_root=_trusted_root(trusted_root))
    try:
        data = Path(artifact).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the artifact: {exc.strerror or exc}", where=str(artifact),
                         fix="give the signed file") from None
    _sigstore_verify(lambda: verifier.verify_artifact(data, bundle, signer.to_sigstore()), str(bundle_path))
    sans = cert_sans(bundle.signing_certificate)
    exact = signer.expected_identity()
    return exact if exact in sans else (sans[0] if sans else "")


# --------------------------------------------------------------------------- key mode


def load_public_key(path: str | Path) -> Any:
    """Return the pinned EC P-256 or Ed25519 public key stored as PEM at ``path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the public key: {exc.strerror or exc}", where=str(path),
                         fix="give the .pub.pem written by `quantsafe keygen`") from None
    except ValueError as exc:
        raise UsageError(f"not a PEM public key: {exc}", where=str(path),
                         fix="give the .pub.pem written by `quantsafe keygen`") from None
    if isinstance(key, ed25519.Ed25519PublicKey) or (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        return key
    raise UsageError("unsupported public key (only EC P-256 and Ed25519)", where=str(path),
                     fix="give the .pub.pem written by `quantsafe keygen`")


def verify_with_key(envelope_path: str | Path, artifacts: Sequence[str | Path],
                    public_key_path: str | Path) -> VerifiedAttestation:
    """Return what a key-mode DSSE envelope attests, signed by the pinned key; raise VerificationFailed."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_public_key(public_key_path)
    pinned = key_id(key)
    where = str(envelope_path)
    try:
        envelope = json.loads(_read_text(envelope_path, "DSSE envelope"))
    except json.JSONDecodeError as exc:
        raise fail_verification(f"not a JSON DSSE envelope: {exc}", where) from None
    if not isinstance(envelope, dict) or "payload" not in envelope or "signatures" not in envelope:
        hint = " (this looks like a Sigstore bundle: verify it keyless)" if isinstance(envelope, dict) \
            and "mediaType" in envelope else ""
        raise fail_verification(f"not a DSSE envelope{hint}", where)
    payload_type = envelope.get("payloadType")
    try:
        payload = base64.b64decode(str(envelope["payload"]), validate=True)
    except (binascii.Error, ValueError):
        raise fail_verification("the payload is not base64", f"{where}: payload") from None
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise fail_verification("the envelope carries no signature", f"{where}: signatures")
    message = pae(str(payload_type), payload)
    verified = False
    for entry in signatures:
        if not isinstance(entry, dict):
            continue
        try:
            sig = base64.b64decode(str(entry.get("sig", "")), validate=True)
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            else:
                key.verify(sig, message)
            verified = True
            break
        except (InvalidSignature, binascii.Error, ValueError):
            continue
    if not verified:
        raise fail_verification(f"no signature by the pinned key {pinned[:16]}… verifies over this envelope",
                    f"{where}: signatures")
    statement = check_statement(str(payload_type), payload, artifacts, where)
    return _summary("key", pinned, None, statement)
