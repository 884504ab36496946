"""Signed screening records: in-toto statements, Sigstore keyless signing, key-mode DSSE.

The statement is an in-toto Statement v1 whose subjects are the candidate
artifact's files (sha256) and whose predicate is the screening record
(docs/record-format.md) plus a ``thresholds`` block holding the decision numbers
as decimal strings. The statement is serialized as canonical JSON and wrapped
in a DSSE envelope, either

- keyless: ``sigstore`` (``SigningContext`` + ``Signer.sign_dsse``) with the CI
  workflow's ambient OIDC identity; the output is a Sigstore bundle
  ``<artifact>.quantsafe.sigstore.json``; or
- with a local key (EC P-256 or Ed25519) for air-gapped runners; the output is a
  plain DSSE envelope ``<artifact>.quantsafe.dsse.json``.

A signature proves what was screened, with which configuration and by whom:
never that the model is safe (``types.LIMITS_SENTENCE``). Verification lives in
``verify.py``. ``sigstore`` and ``cryptography`` are imported inside the
functions that need them.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from pytest_quantsafe import _util
from pytest_quantsafe.errors import InputError, SigningError
from pytest_quantsafe.types import BANDS, canonical_json, sha256_hex

__all__ = [
    "BUNDLE_SUFFIX", "ENVELOPE_SUFFIX", "PAYLOAD_TYPE", "PREDICATE_TYPE", "STATEMENT_TYPE",
    "build_statement", "decimal_string", "default_output_path", "envelope_json", "generate_key",
    "key_id", "pae", "sign_keyless", "sign_with_key", "statement_bytes", "subjects_from_paths",
    "subjects_from_record", "thresholds",
]

#: The one versioned URI naming our predicate.
PREDICATE_TYPE = "https://quantsafe.dev/attestation/screening/v2"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
#: DSSE payload type of an in-toto statement (what ``gh attestation verify`` expects).
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUNDLE_SUFFIX = ".quantsafe.sigstore.json"
ENVELOPE_SUFFIX = ".quantsafe.dsse.json"


# --------------------------------------------------------------------------- statement


def file_sha256(path: Path) -> str:
    """Return the lowercase hex SHA-256 of a file, read in chunks."""
    try:
        return _util.file_sha256(path)
    except OSError as exc:
        raise InputError(f"cannot read artifact file: {exc.strerror or exc}", where=str(path),
                         fix="give the path of an existing, readable artifact file") from None


def subjects_from_record(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return the in-toto subjects of a record: one per candidate artifact file, sorted by name."""
    try:
        files = record["candidate"]["artifact"]["files"]
    except (KeyError, TypeError):
        raise InputError("the record has no candidate.artifact.files", where="record: candidate.artifact.files",
                         fix="sign a record written by `quantsafe screen` (docs/record-format.md)") from None
    if not isinstance(files, list) or not files:
        raise InputError("the record lists no candidate artifact files: nothing to attest",
                         where="record: candidate.artifact.files",
                         fix="screen a local artifact (a file or a model directory) before signing")
    subjects = []
    for i, entry in enumerate(files):
        sha = entry.get("sha256") if isinstance(entry, Mapping) else None
        path = entry.get("path") if isinstance(entry, Mapping) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha) \
                or not isinstance(path, str) or not path:
            raise InputError("candidate artifact file without a path and a lowercase sha256",
                             where=f"record: candidate.artifact.files[{i}]",
                             fix="sign the record exactly as quantsafe wrote it")
        subjects.append({"name": Path(path).name, "digest": {"sha256": sha}})
    return sorted(subjects, key=lambda s: (s["name"], s["digest"]["sha256"]))


def subjects_from_paths(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Return subjects for files given on the command line.

    A model folder gives one subject per weight file and one for its ``config.json``: the
    files the HF engine digests into the record (``_util.model_folder_files``).
    """
    subjects: list[dict[str, Any]] = []
    for raw in paths:
        path = _util.safe_path(raw, "artifact file")
        if path.is_dir():
            weights, config = _util.model_folder_files(path)
            if not weights:
                raise InputError("the model directory holds no weight files", where=str(path),
                                 fix=f"give the weight files themselves ({', '.join(_util.WEIGHT_SUFFIXES)})")
            members = [*weights, config] if config is not None else weights
            subjects.extend({"name": p.name, "digest": {"sha256": file_sha256(p)}} for p in members)
        elif path.is_file():
            subjects.append({"name": path.name, "digest": {"sha256": file_sha256(path)}})
        else:
            raise InputError("no such artifact file or directory", where=str(path),
                             fix="give the path of the candidate artifact that was screened")
    return sorted(subjects, key=lambda s: (s["name"], s["digest"]["sha256"]))


def decimal_string(value: Any) -> str | None:
    """Return a number as an exact decimal string (``0.1`` -> ``"0.1"``), or None for None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"threshold {value!r} is not a number", fix="sign the record exactly as quantsafe wrote it")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"threshold {value!r} is not finite", fix="sign the record exactly as quantsafe wrote it")
    return format(Decimal(repr(value)), "f") if isinstance(value, float) else str(value)


def _bands_of(record: Mapping[str, Any]) -> Mapping[str, Any]:
    policy = record.get("policy")
    if isinstance(policy, Mapping) and isinstance(policy.get("bands"), Mapping):
        return policy["bands"]  # type: ignore[no-any-return]
    calibration = record.get("calibration")
    if isinstance(calibration, Mapping) and isinstance(calibration.get("bands"), Mapping):
        return calibration["bands"]  # type: ignore[no-any-return]
    raise InputError("the record has neither policy.bands nor calibration.bands", where="record: policy.bands",
                     fix="sign a record written by `quantsafe screen` (docs/record-format.md)")


def thresholds(record: Mapping[str, Any]) -> dict[str, str | None]:
    """Return the record's decision thresholds as decimal strings (band cutoffs, fail_at, limits)."""
    bands = _bands_of(record)
    policy = record.get("policy") if isinstance(record.get("policy"), Mapping) else {}
    assert isinstance(policy, Mapping)
    fail_at = policy.get("fail_at", "MODERATE")
    if fail_at not in BANDS:
        raise InputError(f"fail_at {fail_at!r} is not a band", where="record: policy.fail_at",
                         fix=f"use one of {', '.join(BANDS)}")
    cut = {"LOW": 0.0, "MODERATE": bands.get("moderate"), "HIGH": bands.get("high")}[fail_at]
    return {
        "band_moderate": decimal_string(bands.get("moderate")),
        "band_high": decimal_string(bands.get("high")),
        "fail_at": str(fail_at),
        "fail_at_rtsi": decimal_string(cut),
        "max_refusal_drop_pp": decimal_string(policy.get("max_refusal_drop_pp")),
        "max_benign_refusal_increase_pp": decimal_string(policy.get("max_benign_refusal_increase_pp")),
        "min_band_stability": decimal_string(policy.get("min_band_stability")),
        "min_baseline_refusals": decimal_string(policy.get("min_baseline_refusals")),
        "max_lost_refusals_pp": decimal_string(policy.get("max_lost_refusals_pp")),
        "require_power_pp": decimal_string(policy.get("require_power_pp")),
        "mode": str(policy.get("mode", "enforce")),
    }


def build_statement(record: Mapping[str, Any], subjects: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Return the in-toto Statement v1 for a record (subjects default to the candidate's files)."""
    if not isinstance(record, Mapping):
        raise InputError("the record is not a JSON object", fix="sign record.json as quantsafe wrote it")
    chosen = copy.deepcopy([dict(s) for s in subjects]) if subjects is not None else subjects_from_record(record)
    if not chosen:
        raise InputError("a statement needs at least one subject", fix="give the candidate artifact files")
    predicate = copy.deepcopy(dict(record))  # the statement never aliases the caller's record
    predicate["thresholds"] = thresholds(record)
    return {"_type": STATEMENT_TYPE, "subject": chosen, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    """Return the canonical JSON bytes of a statement (the DSSE payload)."""
    try:
        return canonical_json(statement)
    except ValueError as exc:  # NaN / inf: never sign a number JSON cannot carry
        raise InputError(f"the statement holds a non-finite number: {exc}",
                         fix="non-finite values must be flagged in the record, not signed") from None


def check_artifacts_match(statement: Mapping[str, Any], artifacts: Sequence[str | Path]) -> None:
    """Return None when the given files are exactly the statement's subjects; raise InputError otherwise."""
    given = {s["digest"]["sha256"] for s in subjects_from_paths(artifacts)}
    wanted = {s["digest"]["sha256"] for s in statement["subject"]}
    if given != wanted:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise InputError("the artifact files do not match the record's candidate files",
                         where=f"missing sha256 {', '.join(d[:12] for d in missing) or '-'}; "
                               f"unexpected sha256 {', '.join(d[:12] for d in extra) or '-'}",
                         fix="sign the record of the artifact you are releasing (or pass its files)")


def default_output_path(artifacts: Sequence[str | Path], record_path: str | Path, *, keyless: bool) -> Path:
    """Return ``<artifact>.quantsafe.sigstore.json`` (keyless) or ``.quantsafe.dsse.json`` (key mode)."""
    base = Path(artifacts[0]) if artifacts else Path(record_path)
    return base.with_name(base.name.rstrip("/") + (BUNDLE_SUFFIX if keyless else ENVELOPE_SUFFIX))


# --------------------------------------------------------------------------- DSSE with a local key


def pae(payload_type: str, payload: bytes) -> bytes:
    """Return the DSSE v1 pre-authentication encoding of a payload."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: Any) -> str:
    """Return the key id: hex SHA-256 of the public key's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sha256_hex(der)


def _password_bytes(password: str | bytes | None) -> bytes | None:
    if password is None:
        env = os.environ.get("QUANTSAFE_KEY_PASSWORD")
        return env.encode("utf-8") if env else None
    return password.encode("utf-8") if isinstance(password, str) else password


def generate_key(out: str | Path, *, algorithm: str = "ec-p256", password: str | bytes | None = None,
                 overwrite: bool = False) -> dict[str, str]:
    """Return paths and key id of a new signing key written to ``out`` (private) and ``out.pub``.

    The private key is PKCS#8 PEM (encrypted when a password is given or
    ``QUANTSAFE_KEY_PASSWORD`` is set), created with mode 0600; the public key
    ``<out stem>.pub.pem`` is what verifiers pin.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    out = Path(out)
    pub = out.with_name(out.stem + ".pub.pem")
    for path in (out, pub):
        if path.exists() and not overwrite:
            raise InputError("refusing to overwrite an existing key file", where=str(path),
                             fix="choose another --out path or delete the old key deliberately")
        _util.check_writable(path, "key file", folder=False)
    if algorithm == "ec-p256":
        private: Any = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise InputError(f"unknown key algorithm {algorithm!r}", where="--algorithm", fix="use ec-p256 or ed25519")
    secret = _password_bytes(password)
    encryption = (serialization.BestAvailableEncryption(secret) if secret
                  else serialization.NoEncryption())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"private_key": str(out), "public_key": str(pub), "key_id": key_id(private.public_key()),
            "algorithm": algorithm}


def load_private_key(path: str | Path, password: str | bytes | None = None) -> Any:
    """Return the EC P-256 or Ed25519 private key stored as PEM at ``path``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the signing key: {exc.strerror or exc}", where=str(path),
                           fix="create one with `quantsafe keygen --out key.pem`") from None
    try:
        key = serialization.load_pem_private_key(data, password=_password_bytes(password))
    except (TypeError, ValueError) as exc:
        raise SigningError(f"cannot load the signing key: {exc}", where=str(path),
                           fix="give a PEM private key from `quantsafe keygen`; set QUANTSAFE_KEY_PASSWORD "
                               "if it is encrypted") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise SigningError("unsupported key type (only EC P-256 and Ed25519 sign records)", where=str(path),
                       fix="create a key with `quantsafe keygen --out key.pem`")


def sign_with_key(statement: Mapping[str, Any], key_path: str | Path,
                  password: str | bytes | None = None) -> dict[str, Any]:
    """Return a DSSE envelope of the statement signed with the local key at ``key_path``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_private_key(key_path, password)
    payload = statement_bytes(statement)
    message = pae(PAYLOAD_TYPE, payload)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(message)
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}],
    }


def envelope_json(envelope: Mapping[str, Any]) -> str:
    """Return a DSSE envelope as stable JSON text with a trailing newline."""
    return json.dumps(envelope, sort_keys=True, indent=2) + "\n"


# --------------------------------------------------------------------------- keyless (Sigstore)


def _identity_token(explicit: str | None) -> str:
    if explicit:
        return explicit
    from sigstore.oidc import IdentityError, detect_credential

    try:
        token = detect_credential()
    except IdentityError as exc:
        raise SigningError(f"ambient OIDC credential detection failed: {exc}",
                           where="GitHub Actions OIDC (ACTIONS_ID_TOKEN_REQUEST_URL)",
                           fix="give the job `permissions: id-token: write`") from None
    if not token:
        raise SigningError("no ambient OIDC credential found for keyless signing",
                           where="environment (GITHUB_ACTIONS, ACTIONS_ID_TOKEN_REQUEST_*)",
                           fix="run in GitHub Actions with `permissions: id-token: write`, pass "
                               "--identity-token, or sign with a local key (--key)")
    return str(token)


def _trust_config(path: str | Path | None) -> Any:
    from sigstore.models import ClientTrustConfig

    if path is None:
        try:
            return ClientTrustConfig.production()
        except Exception as exc:  # noqa: BLE001 - TUFError and network errors: the trust root is unknown
            raise SigningError(f"cannot fetch Sigstore's TUF trust metadata ({type(exc).__name__}: "
                               f"{str(exc)[:200]})", where="Sigstore TUF repository (tuf-repo-cdn.sigstore.dev)",
                               fix="allow egress to Sigstore (TUF, Fulcio, Rekor), pass --trust-config with a "
                                   "ClientTrustConfig JSON, or sign with a local key (--key) on runners "
                                   "without egress") from None
    try:
        return ClientTrustConfig.from_json(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SigningError(f"cannot read the trust config: {exc.strerror or exc}", where=str(path),
                           fix="give a Sigstore ClientTrustConfig JSON file") from None
    except Exception as exc:  # noqa: BLE001 - sigstore_models raises its own validation errors
        raise SigningError(f"invalid Sigstore trust config: {exc}", where=str(path),
                           fix="give a Sigstore ClientTrustConfig JSON file "
                               "(application/vnd.dev.sigstore.clienttrustconfig.v0.1+json)") from None


def sign_keyless(statement: Mapping[str, Any], *, identity_token: str | None = None,
                 trust_config: str | Path | None = None) -> str:
    """Return the Sigstore bundle JSON of the statement, signed keyless (Fulcio + Rekor).

    ``identity_token`` defaults to the ambient credential (GitHub Actions OIDC with
    ``id-token: write``); ``trust_config`` defaults to Sigstore's production
    instance (a ClientTrustConfig JSON file selects another one).
    """
    from sigstore.dsse import Statement
    from sigstore.errors import Error as SigstoreError
    from sigstore.oidc import IdentityError, IdentityToken
    from sigstore.sign import SigningContext

    payload = statement_bytes(statement)
    raw_token = _identity_token(identity_token)
    config = _trust_config(trust_config)
    try:
        token = IdentityToken(raw_token)
    except IdentityError as exc:
        raise SigningError(f"the OIDC identity token is unusable: {exc}",
                           fix="use a fresh token with audience 'sigstore'") from None
    try:
        context = SigningContext.from_trust_config(config)
        with context.signer(token, cache=True) as signer:
            bundle = signer.sign_dsse(Statement(payload))
    except SigstoreError as exc:
        raise SigningError(f"Sigstore refused to sign: {exc}", fix="see the Sigstore message; retry "
                           "or sign with a local key for air-gapped runners") from None
    except Exception as exc:  # noqa: BLE001 - network, Fulcio/Rekor client errors: all mean "not signed"
        raise SigningError(f"keyless signing failed: {type(exc).__name__}: {exc}",
                           fix="check that Fulcio and Rekor are reachable and the token is valid") from None
    return str(bundle.to_json())
