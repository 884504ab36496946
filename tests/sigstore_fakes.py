"""An in-process Sigstore instance for offline tests: fake Fulcio, fake Rekor, test OIDC issuer.

"Fake" means self-hosted, not pretend: every signature, certificate, SCT,
Merkle inclusion proof and checkpoint here is real cryptography, built to the
formats the real services use, so the *real* ``sigstore`` Signer and Verifier
run unchanged against it over real HTTP on 127.0.0.1:

- a test CA (self-signed, P-256) plays Fulcio's root; Fulcio checks the OIDC
  token's signature against the test issuer key, checks the CSR's proof of
  possession, and issues a 10-minute code-signing certificate with the GitHub
  workflow extensions (OIDs 1.3.6.1.4.1.57264.1.*) and an embedded SCT signed by
  the test CT log key over the precertificate (RFC 6962);
- Rekor (API v1) checks the DSSE envelope's signature against the certificate,
  appends the canonical ``dsse`` entry to an RFC 6962 Merkle tree and answers
  with the inclusion proof, a signed checkpoint and a signed entry timestamp;
- the GitHub Actions token endpoint (``ACTIONS_ID_TOKEN_REQUEST_URL``) hands
  out JWTs signed by the test issuer key, so ambient credential detection runs
  for real.

``trust_config()`` is the matching ClientTrustConfig (trusted root + signing
config) that points sigstore at this server.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import rfc8785
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
_SCT_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2")
_FULCIO = "1.3.6.1.4.1.57264.1."


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_id(key: Any) -> bytes:
    return hashlib.sha256(_spki(key)).digest()


def _der_utf8(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"\x0c" + _der_len(len(raw)) + raw


def _der_octets(raw: bytes) -> bytes:
    return b"\x04" + _der_len(len(raw)) + raw


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- RFC 6962 Merkle tree


def _leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def _node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def merkle_root(leaves: list[bytes]) -> bytes:
    """Return the RFC 6962 tree head of the given leaf hashes."""
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def merkle_path(index: int, leaves: list[bytes]) -> list[bytes]:
    """Return the RFC 6962 audit path of leaf ``index``, lowest level first."""
    if len(leaves) == 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return merkle_path(index, leaves[:k]) + [merkle_root(leaves[k:])]
    return merkle_path(index - k, leaves[k:]) + [merkle_root(leaves[:k])]


# --------------------------------------------------------------------------- the instance


class FakeSigstore:
    """A running Fulcio + Rekor + GitHub OIDC token endpoint on 127.0.0.1 with its own keys."""

    def __init__(self, issuer: str = GITHUB_ISSUER) -> None:
        self.issuer = issuer
        now = dt.datetime.now(dt.timezone.utc)
        self.start = now - dt.timedelta(days=1)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        self.oidc_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "quantsafe-test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "fake-fulcio")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.ca_key.public_key())
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.start).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.leaves: list[bytes] = []
        self.entries: list[dict[str, Any]] = []
        self.tree_id = 4242
        self.origin = f"rekor.quantsafe.test - {self.tree_id}"
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop the HTTP server."""
        self._server.shutdown()
        self._server.server_close()

    # ----------------------------------------------------------------------- trust material

    def trusted_root(self) -> dict[str, Any]:
        """Return the trusted root (test CA, CT log key, Rekor key) in Sigstore's JSON layout."""
        def log(key: Any) -> dict[str, Any]:
            return {"baseUrl": self.url, "hashAlgorithm": "SHA2_256",
                    "publicKey": {"rawBytes": _b64(_spki(key.public_key())),
                                  "keyDetails": "PKIX_ECDSA_P256_SHA_256", "validFor": {"start": _iso(self.start)}},
                    "logId": {"keyId": _b64(_key_id(key.public_key()))}}
        return {
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [log(self.rekor_key)],
            "certificateAuthorities": [{
                "subject": {"organization": "quantsafe-test", "commonName": "fake-fulcio"},
                "uri": self.url,
                "certChain": {"certificates": [{"rawBytes": _b64(self.ca_cert.public_bytes(serialization.Encoding.DER))}]},
                "validFor": {"start": _iso(self.start)},
            }],
            "ctlogs": [log(self.ct_key)],
            "timestampAuthorities": [],
        }

    def signing_config(self) -> dict[str, Any]:
        """Return the signing config pointing Fulcio and Rekor (API v1) at this server."""
        service = {"url": self.url, "majorApiVersion": 1, "validFor": {"start": _iso(self.start)},
                   "operator": "quantsafe-test"}
        return {"mediaType": "application/vnd.dev.sigstore.signingconfig.v0.2+json",
                "caUrls": [service], "oidcUrls": [], "rekorTlogUrls": [service], "tsaUrls": [],
                "rekorTlogConfig": {"selector": "ANY"}, "tsaConfig": {"selector": "ANY"}}

    def trust_config(self) -> dict[str, Any]:
        """Return the ClientTrustConfig (trusted root + signing config) for this instance."""
        return {"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
                "trustedRoot": self.trusted_root(), "signingConfig": self.signing_config()}

    # ----------------------------------------------------------------------- OIDC

    def token(self, repository: str = "quantsafe/models", workflow: str = ".github/workflows/release.yml",
              ref: str = "refs/heads/main", *, issuer: str | None = None, audience: str = "sigstore",
              lifetime: int = 300) -> str:
        """Return a GitHub Actions-style OIDC JWT signed by the test issuer key."""
        now = int(time.time())
        claims = {
            "iss": issuer or self.issuer, "aud": audience, "iat": now, "nbf": now, "exp": now + lifetime,
            "sub": f"repo:{repository}:ref:{ref}", "repository": repository,
            "repository_owner": repository.split("/")[0], "ref": ref, "sha": "0" * 40,
            "workflow": "release", "event_name": "push", "runner_environment": "github-hosted",
            "job_workflow_ref": f"{repository}/{workflow}@{ref}", "workflow_ref": f"{repository}/{workflow}@{ref}",
            "run_id": "1", "run_attempt": "1",
        }
        return jwt.encode(claims, self.oidc_key, algorithm="ES256")

    # ----------------------------------------------------------------------- Fulcio

    def issue_certificate(self, token: str, csr_pem: bytes) -> list[str]:
        """Return the PEM chain [leaf, CA] for a CSR, after checking the token and the CSR signature."""
        claims = jwt.decode(token, self.oidc_key.public_key(), algorithms=["ES256"], audience="sigstore")
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature invalid (no proof of possession)")
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        workflow_ref = claims["job_workflow_ref"]
        repo_url = f"https://github.com/{claims['repository']}"
        raw = {1: claims["iss"], 2: claims["event_name"], 3: claims["sha"], 4: claims["workflow"],
               5: claims["repository"], 6: claims["ref"]}
        der = {8: claims["iss"], 9: f"https://github.com/{workflow_ref}", 11: claims["runner_environment"],
               12: repo_url, 13: claims["sha"], 14: claims["ref"],
               21: f"{repo_url}/actions/runs/{claims['run_id']}/attempts/{claims['run_attempt']}"}
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(self.ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=30)).not_valid_after(now + dt.timedelta(minutes=10))
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"https://github.com/{workflow_ref}")]), critical=True)
        )
        for n, value in raw.items():
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(_FULCIO + str(n)), value.encode()), critical=False)
        for n, value in der.items():
            builder = builder.add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier(_FULCIO + str(n)), _der_utf8(value)), critical=False)
        # The precertificate TBS is the final TBS without the SCT list: sign it first, then embed the SCT.
        precert = builder.sign(self.ca_key, hashes.SHA256())
        sct = self._sct(precert.tbs_certificate_bytes, int(time.time() * 1000))
        cert = builder.add_extension(x509.UnrecognizedExtension(_SCT_OID, _der_octets(sct)),
                                     critical=False).sign(self.ca_key, hashes.SHA256())
        if cert.tbs_precertificate_bytes != precert.tbs_certificate_bytes:
            raise AssertionError("precertificate TBS differs from the certificate's")
        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in (cert, self.ca_cert)]

    def _sct(self, tbs: bytes, timestamp_ms: int) -> bytes:
        issuer_key_hash = _key_id(self.ca_key.public_key())
        signed = (struct.pack("!BBQH", 0, 0, timestamp_ms, 1) + issuer_key_hash
                  + len(tbs).to_bytes(3, "big") + tbs + struct.pack("!H", 0))
        signature = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        one = (b"\x00" + _key_id(self.ct_key.public_key()) + struct.pack("!QH", timestamp_ms, 0)
               + b"\x04\x03" + struct.pack("!H", len(signature)) + signature)
        body = struct.pack("!H", len(one)) + one
        return struct.pack("!H", len(body)) + body

    # ----------------------------------------------------------------------- Rekor

    def log_dsse(self, proposed: dict[str, Any]) -> dict[str, Any]:
        """Return the Rekor v1 response for a proposed dsse entry, after checking its signature."""
        if proposed.get("kind") != "dsse":
            raise ValueError(f"unsupported entry kind {proposed.get('kind')!r}")
        content = proposed["spec"]["proposedContent"]
        envelope_text: str = content["envelope"]
        envelope = json.loads(envelope_text)
        cert = x509.load_pem_x509_certificate(base64.b64decode(content["verifiers"][0]))
        payload = base64.b64decode(envelope["payload"])
        kind = envelope["payloadType"].encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)
        signatures = []
        for s in envelope["signatures"]:
            cert.public_key().verify(base64.b64decode(s["sig"]), pae, ec.ECDSA(hashes.SHA256()))
            signatures.append({"signature": s["sig"], "verifier": content["verifiers"][0]})
        body_obj = {"apiVersion": "0.0.1", "kind": "dsse", "spec": {
            "envelopeHash": {"algorithm": "sha256", "value": hashlib.sha256(envelope_text.encode()).hexdigest()},
            "payloadHash": {"algorithm": "sha256", "value": hashlib.sha256(payload).hexdigest()},
            "signatures": signatures}}
        body = rfc8785.dumps(body_obj)
        with self._lock:
            index = len(self.leaves)
            self.leaves.append(_leaf_hash(body))
            leaves = list(self.leaves)
        root = merkle_root(leaves)
        log_id = _key_id(self.rekor_key.public_key())
        integrated = int(time.time())
        b64_body = _b64(body)
        set_payload = rfc8785.dumps({"body": b64_body, "integratedTime": integrated,
                                     "logID": log_id.hex(), "logIndex": index})
        note = f"{self.origin}\n{len(leaves)}\n{_b64(root)}\n"
        note_sig = self.rekor_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        checkpoint = f"{note}\n\u2014 rekor.quantsafe.test {_b64(log_id[:4] + note_sig)}\n"
        entry = {
            "body": b64_body, "integratedTime": integrated, "logID": log_id.hex(), "logIndex": index,
            "verification": {
                "inclusionProof": {"checkpoint": checkpoint, "hashes": [h.hex() for h in merkle_path(index, leaves)],
                                   "logIndex": index, "rootHash": root.hex(), "treeSize": len(leaves)},
                "signedEntryTimestamp": _b64(self.rekor_key.sign(set_payload, ec.ECDSA(hashes.SHA256()))),
            },
        }
        self.entries.append(entry)
        return {self.leaves[index].hex(): entry}

    # ----------------------------------------------------------------------- HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        instance = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                return

            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # GitHub Actions OIDC token endpoint
                url = urlparse(self.path)
                instance.requests.append(f"GET {url.path}")
                if url.path != "/github-token" or self.headers.get("Authorization") != "bearer runner-secret":
                    self._reply(404 if url.path != "/github-token" else 401, {"message": "no"})
                    return
                query = parse_qs(url.query)
                audience = query.get("audience", ["sigstore"])[0]
                repo = query.get("repo", ["quantsafe/models"])[0]
                ref = query.get("ref", ["refs/heads/main"])[0]
                self._reply(200, {"value": instance.token(repo, ref=ref, audience=audience)})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                instance.requests.append(f"POST {self.path}")
                try:
                    if self.path == "/api/v2/signingCert":
                        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                        csr = base64.b64decode(body["certificateSigningRequest"])
                        chain = instance.issue_certificate(token, csr)
                        self._reply(201, {"signedCertificateEmbeddedSct": {"chain": {"certificates": chain}}})
                    elif self.path == "/api/v1/log/entries":
                        self._reply(201, instance.log_dsse(body))
                    else:
                        self._reply(404, {"code": 404, "message": f"no route {self.path}"})
                except Exception as exc:  # noqa: BLE001 - a refused request is a 400 with the reason, like the real services
                    self._reply(400, {"code": 400, "message": f"{type(exc).__name__}: {exc}"})

        return Handler
