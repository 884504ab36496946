"""Who must have signed a keyless attestation, and how a Sigstore certificate is read for it.

``SignerPolicy`` pins the OIDC issuer and the signer identity (an exact SAN, a pattern,
or the GitHub repository, workflow and ref); ``to_sigstore`` turns it into the checks
sigstore runs on the certificate. ``verify.py`` uses it for keyless bundles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pytest_quantsafe.errors import UsageError

__all__ = ["GITHUB_ISSUER", "SignerPolicy", "cert_issuer", "cert_sans"]

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
_OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
_OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
_OID_REPOSITORY_V1 = "1.3.6.1.4.1.57264.1.5"
_OID_SOURCE_REPOSITORY_URI = "1.3.6.1.4.1.57264.1.12"


@dataclass(frozen=True)
class SignerPolicy:
    """Who must have signed: the OIDC issuer and the signer identity (exact, pattern or GitHub parts).

    With ``repository``, ``workflow`` (path in the repository) and ``ref`` the
    identity is the GitHub workflow SAN ``https://github.com/<repository>/<workflow>@<ref>``
    and the certificate's repository extension must match too.
    """

    issuer: str
    identity: str | None = None
    identity_pattern: str | None = None
    repository: str | None = None
    workflow: str | None = None
    ref: str | None = None

    def expected_identity(self) -> str | None:
        """Return the exact SAN this policy demands, or None when it matches a pattern."""
        if self.identity:
            return self.identity
        if self.repository and self.workflow and self.ref:
            return f"https://github.com/{self.repository}/{self.workflow.lstrip('/')}@{self.ref}"
        return None

    def validate(self) -> None:
        """Return None when the policy pins an issuer and an identity; raise UsageError otherwise."""
        if not self.issuer:
            raise UsageError("no OIDC issuer pinned", where="--issuer",
                             fix=f"pin the issuer, e.g. --issuer {GITHUB_ISSUER}")
        exact = self.expected_identity()
        parts = [self.repository, self.workflow, self.ref]
        if self.identity and self.identity_pattern:
            raise UsageError("--identity and --identity-pattern exclude each other", where="--identity-pattern",
                             fix="pin one exact identity or one explicit pattern")
        if any(parts) and not all(parts) and not self.identity_pattern and not self.identity:
            raise UsageError("--repository, --workflow and --ref pin the identity together",
                             where="--repository / --workflow / --ref",
                             fix="give all three, or an explicit --identity-pattern with --repository")
        if exact is None and not self.identity_pattern:
            raise UsageError("no signer identity pinned: any identity would be accepted",
                             where="--identity / --identity-pattern / --repository --workflow --ref",
                             fix="pin --repository OWNER/NAME --workflow .github/workflows/X.yml --ref REF, "
                                 "or --identity SAN, or an explicit --identity-pattern REGEX")
        if self.identity_pattern:
            try:
                re.compile(self.identity_pattern)
            except re.error as exc:
                raise UsageError(f"invalid --identity-pattern: {exc}", where="--identity-pattern",
                                 fix="give a Python regular expression matched against the whole SAN") from None

    def to_sigstore(self) -> Any:
        """Return the sigstore VerificationPolicy enforcing this signer policy."""
        from sigstore.verify import policy as sp

        checks: list[Any] = [_IssuerIs(self.issuer)]
        exact = self.expected_identity()
        if exact is not None:
            checks.append(sp.Identity(identity=exact))
        if self.identity_pattern:
            checks.append(_SANPattern(self.identity_pattern))
        if self.repository:
            checks.append(_RepositoryIs(self.repository))
        return sp.AllOf(checks)


class _IssuerIs:
    """A sigstore policy: the certificate's OIDC issuer (v2 extension, else v1) is the pinned one."""

    def __init__(self, issuer: str) -> None:
        self._issuer = issuer

    def verify(self, cert: Any) -> None:
        from sigstore.errors import VerificationError

        actual = cert_issuer(cert)
        if actual != self._issuer:
            raise VerificationError(f"OIDC issuer {actual!r} is not the pinned issuer {self._issuer!r}")


class _RepositoryIs:
    """A sigstore policy: the certificate's GitHub repository extension names the pinned repository."""

    def __init__(self, repository: str) -> None:
        self._repository = repository

    def verify(self, cert: Any) -> None:
        from sigstore.errors import VerificationError

        actual = _cert_ext(cert, _OID_REPOSITORY_V1, der=False)
        if actual is None:
            uri = _cert_ext(cert, _OID_SOURCE_REPOSITORY_URI, der=True)
            actual = uri.removeprefix("https://github.com/") if uri else None
        if actual != self._repository:
            raise VerificationError(f"signing repository {actual!r} is not the pinned repository "
                                    f"{self._repository!r}")


class _SANPattern:
    """A sigstore policy: some URI/e-mail SAN of the certificate fully matches a regular expression."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)

    def verify(self, cert: Any) -> None:
        from sigstore.errors import VerificationError

        sans = cert_sans(cert)
        if not any(self._pattern.fullmatch(s) for s in sans):
            raise VerificationError(f"no SAN matches the pattern {self._pattern.pattern!r}; actual SANs: {sans}")


def cert_sans(cert: Any) -> list[str]:
    """Return the certificate's URI and e-mail SANs, sorted."""
    from cryptography.x509 import (
        ExtensionNotFound,
        RFC822Name,
        SubjectAlternativeName,
        UniformResourceIdentifier,
    )

    try:
        ext = cert.extensions.get_extension_for_class(SubjectAlternativeName).value
    except ExtensionNotFound:
        return []
    return sorted(set(ext.get_values_for_type(UniformResourceIdentifier)) | set(ext.get_values_for_type(RFC822Name)))


def _cert_ext(cert: Any, oid: str, *, der: bool) -> str | None:
    """Return a Fulcio extension's text: v1 extensions hold raw bytes, v2 a DER UTF8String."""
    from cryptography.x509 import ExtensionNotFound, ObjectIdentifier

    try:
        raw = bytes(cert.extensions.get_extension_for_oid(ObjectIdentifier(oid)).value.value)
    except ExtensionNotFound:
        return None
    if not der:
        return raw.decode("utf-8", "replace")
    if len(raw) < 2 or raw[0] != 0x0C:
        return None
    length, offset = raw[1], 2
    if length & 0x80:
        n = length & 0x7F
        length, offset = int.from_bytes(raw[2:2 + n], "big"), 2 + n
    return raw[offset:offset + length].decode("utf-8", "replace")


def cert_issuer(cert: Any) -> str | None:
    """Return the certificate's OIDC issuer (v2 extension, else v1), or None."""
    return _cert_ext(cert, _OID_ISSUER_V2, der=True) or _cert_ext(cert, _OID_ISSUER_V1, der=False)
