"""Keyless attestations through the real sigstore Signer and Verifier, offline.

Signing talks over HTTP on 127.0.0.1 to tests/sigstore_fakes.py (a Fulcio with a
test CA issuing GitHub-workflow certificates with embedded SCTs, and a Rekor
with a real Merkle tree); verification pins that instance's generated trusted
root. The real production and staging bundles from ../shared/test-vectors/sigstore
check the same verification code against Sigstore's own roots.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sigstore_fakes import GITHUB_ISSUER, FakeSigstore
from test_attest import make_record

from pytest_quantsafe.attest import sign as attest
from pytest_quantsafe.attest.verify import SignerPolicy, verify_artifact_signature, verify_keyless
from pytest_quantsafe.cli import main
from pytest_quantsafe.errors import VerificationFailed
from pytest_quantsafe.types import LIMITS_SENTENCE

REPO, WORKFLOW, MAIN = "quantsafe/models", ".github/workflows/release.yml", "refs/heads/main"
IDENTITY = f"https://github.com/{REPO}/{WORKFLOW}@{MAIN}"
PINNED = SignerPolicy(issuer=GITHUB_ISSUER, repository=REPO, workflow=WORKFLOW, ref=MAIN)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeSigstore]:
    instance = FakeSigstore()
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def trust(fake: FakeSigstore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("trust")
    (folder / "trust_config.json").write_text(json.dumps(fake.trust_config()))
    (folder / "trusted_root.json").write_text(json.dumps(fake.trusted_root()))
    return {"config": folder / "trust_config.json", "root": folder / "trusted_root.json"}


@pytest.fixture(scope="module")
def records(smollm2_gguf: Path) -> dict[str, dict[str, Any]]:
    return {"low": make_record(smollm2_gguf, "low"), "high": make_record(smollm2_gguf, "high")}


@pytest.fixture(scope="module")
def sign(fake: FakeSigstore, trust: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
         ) -> Callable[..., Path]:
    folder = tmp_path_factory.mktemp("bundles")
    counter = iter(range(10_000))

    def _sign(statement: dict[str, Any], *, repo: str = REPO, ref: str = MAIN, issuer: str | None = None) -> Path:
        text = attest.sign_keyless(statement, identity_token=fake.token(repo, WORKFLOW, ref, issuer=issuer),
                                   trust_config=trust["config"])
        path = folder / f"b{next(counter)}{attest.BUNDLE_SUFFIX}"
        path.write_text(text)
        return path

    return _sign


@pytest.fixture(scope="module")
def low_bundle(sign: Callable[..., Path], records: dict[str, dict[str, Any]]) -> Path:
    return sign(attest.build_statement(records["low"]))


@pytest.fixture(scope="module")
def high_bundle(sign: Callable[..., Path], records: dict[str, dict[str, Any]]) -> Path:
    return sign(attest.build_statement(records["high"]))


def _edit_payload(bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = json.loads(bundle.read_text())
    statement = json.loads(base64.b64decode(data["dsseEnvelope"]["payload"]))
    edit(statement)
    data["dsseEnvelope"]["payload"] = base64.b64encode(attest.statement_bytes(statement)).decode()
    out = tmp_path / "tampered.sigstore.json"
    out.write_text(json.dumps(data))
    return out


# --------------------------------------------------------------------------- round trip


def test_keyless_round_trip_through_real_sigstore(low_bundle: Path, fake: FakeSigstore, trust: dict[str, Path],
                                                  smollm2_gguf: Path) -> None:
    data = json.loads(low_bundle.read_text())
    assert data["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert data["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    assert data["verificationMaterial"]["tlogEntries"][0]["kindVersion"] == {"kind": "dsse", "version": "0.0.1"}
    assert {"POST /api/v2/signingCert", "POST /api/v1/log/entries"} <= set(fake.requests)
    result = verify_keyless(low_bundle, [smollm2_gguf], PINNED, trusted_root=trust["root"])
    assert (result.method, result.signer, result.issuer) == ("keyless", IDENTITY, GITHUB_ISSUER)
    assert (result.band, result.outcome) == ("LOW", "pass") and result.rtsi is not None and result.rtsi < 0.10
    assert result.subjects[0][1] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_merkle_tree_grows_and_older_bundles_still_verify(sign: Callable[..., Path], records: dict[str, Any],
                                                           low_bundle: Path, trust: dict[str, Path],
                                                           smollm2_gguf: Path, fake: FakeSigstore) -> None:
    for _ in range(3):  # later entries get non-trivial inclusion proofs
        latest = sign(attest.build_statement(records["low"]))
    proof = json.loads(latest.read_text())["verificationMaterial"]["tlogEntries"][0]["inclusionProof"]
    assert int(proof["treeSize"]) == len(fake.leaves) >= 4 and len(proof["hashes"]) >= 2
    for bundle in (low_bundle, latest):
        assert verify_keyless(bundle, [smollm2_gguf], PINNED, trusted_root=trust["root"]).signer == IDENTITY


def test_identity_pattern_pins_tags_only(sign: Callable[..., Path], records: dict[str, Any], trust: dict[str, Path],
                                         smollm2_gguf: Path) -> None:
    tagged = sign(attest.build_statement(records["low"]), ref="refs/tags/v1.2.0")
    tags = SignerPolicy(issuer=GITHUB_ISSUER, repository=REPO,
                        identity_pattern=rf"https://github\.com/{REPO}/\.github/workflows/release\.yml@refs/tags/v.*")
    assert verify_keyless(tagged, [smollm2_gguf], tags, trusted_root=trust["root"]).signer.endswith("@refs/tags/v1.2.0")
    main_bundle = sign(attest.build_statement(records["low"]))
    with pytest.raises(VerificationFailed, match="no SAN matches the pattern"):
        verify_keyless(main_bundle, [smollm2_gguf], tags, trusted_root=trust["root"])


def test_cli_ambient_github_oidc_attest_then_verify(tmp_path: Path, fake: FakeSigstore, trust: dict[str, Path],
                                                    records: dict[str, Any], smollm2_gguf: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{fake.url}/github-token?repo={REPO}&ref={MAIN}")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "runner-secret")
    monkeypatch.delenv("SIGSTORE_IDENTITY_TOKEN", raising=False)
    record = tmp_path / "record.json"
    record.write_text(json.dumps(records["low"]))
    bundle = tmp_path / f"{smollm2_gguf.name}{attest.BUNDLE_SUFFIX}"
    assert main(["attest", str(record), "--artifact", str(smollm2_gguf), "--keyless",
                 "--trust-config", str(trust["config"]), "--out", str(bundle)]) == 0
    assert "GET /github-token" in fake.requests  # the token came from the ambient endpoint
    capsys.readouterr()
    assert main(["verify", str(bundle), "--artifact", str(smollm2_gguf), "--issuer", GITHUB_ISSUER,
                 "--repository", REPO, "--workflow", WORKFLOW, "--ref", MAIN,
                 "--trusted-root", str(trust["root"])]) == 0
    out = capsys.readouterr().out
    assert f"identity: {IDENTITY}" in out and f"issuer:   {GITHUB_ISSUER}" in out
    assert "subject:  SmolLM2-135M-Instruct.Q4_1.gguf sha256:b179c952" in out
    assert "band:     LOW" in out and LIMITS_SENTENCE in out


def test_default_bundle_name_sits_beside_the_artifact(tmp_path: Path) -> None:
    path = attest.default_output_path([tmp_path / "model-Q4_K_M.gguf"], tmp_path / "record.json", keyless=True)
    assert path == tmp_path / "model-Q4_K_M.gguf.quantsafe.sigstore.json"
    assert attest.default_output_path([tmp_path / "model"], "r.json", keyless=False).name == \
        "model.quantsafe.dsse.json"


# --------------------------------------------------------------------------- forgeries (keyless)


def _rejects(bundle: Path, artifacts: list[Path], trust: dict[str, Path], match: str,
             policy: SignerPolicy = PINNED, root: Path | None = None) -> VerificationFailed:
    with pytest.raises(VerificationFailed, match=match) as err:
        verify_keyless(bundle, artifacts, policy, trusted_root=root or trust["root"])
    assert err.value.exit_code == 4
    return err.value


def test_forgery_band_low_to_high(low_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                  smollm2_gguf: Path) -> None:
    forged = _edit_payload(low_bundle, tmp_path, lambda s: s["predicate"]["screening"].update(band="HIGH"))
    _rejects(forged, [smollm2_gguf], trust, "signature verification failed")


def test_forgery_band_high_to_low(high_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                  smollm2_gguf: Path) -> None:
    def edit(s: dict[str, Any]) -> None:
        s["predicate"]["screening"]["band"] = "LOW"
        s["predicate"]["verdict"].update(outcome="pass", exit_code=0)
    _rejects(_edit_payload(high_bundle, tmp_path, edit), [smollm2_gguf], trust, "signature verification failed")


def test_forgery_swapped_subject_digest(low_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                        shared_dir: Path) -> None:
    wheel = shared_dir / "test-vectors" / "sigstore" / "bundle_v3_github.whl"
    forged = _edit_payload(low_bundle, tmp_path, lambda s: s["subject"][0]["digest"].update(
        sha256=attest.file_sha256(wheel)))
    _rejects(forged, [wheel], trust, "signature verification failed")


def test_forgery_extra_subject_validly_signed(sign: Callable[..., Path], records: dict[str, Any],
                                              trust: dict[str, Path], smollm2_gguf: Path, shared_dir: Path) -> None:
    wheel = shared_dir / "test-vectors" / "sigstore" / "bundle_v3_github.whl"
    statement = attest.build_statement(records["low"])
    statement["subject"].append({"name": wheel.name, "digest": {"sha256": attest.file_sha256(wheel)}})
    err = _rejects(sign(statement), [smollm2_gguf, wheel], trust, "not exactly the record's candidate artifact files")
    assert err.where and err.where.endswith("payload.subject")


def test_forgery_wrong_predicate_type_validly_signed(sign: Callable[..., Path], records: dict[str, Any],
                                                     trust: dict[str, Path], smollm2_gguf: Path) -> None:
    statement = attest.build_statement(records["low"])
    statement["predicateType"] = "https://quantsafe.dev/attestation/screening/v0"
    _rejects(sign(statement), [smollm2_gguf], trust, "predicateType")


def test_forgery_wrong_payload_type(low_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                    smollm2_gguf: Path) -> None:
    data = json.loads(low_bundle.read_text())
    data["dsseEnvelope"]["payloadType"] = "application/json"
    forged = tmp_path / "type.sigstore.json"
    forged.write_text(json.dumps(data))
    _rejects(forged, [smollm2_gguf], trust, "signature verification failed|payload type")


def test_forgery_foreign_resign(sign: Callable[..., Path], records: dict[str, Any], trust: dict[str, Path],
                                smollm2_gguf: Path) -> None:
    # A valid signature over the same statement, by another repository's workflow.
    foreign = sign(attest.build_statement(records["low"]), repo="mallory/models")
    _rejects(foreign, [smollm2_gguf], trust, "is not the pinned repository|SANs do not match")


def test_forgery_wrong_workflow_ref(sign: Callable[..., Path], records: dict[str, Any], trust: dict[str, Path],
                                    smollm2_gguf: Path) -> None:
    feature = sign(attest.build_statement(records["low"]), ref="refs/heads/feature")
    _rejects(feature, [smollm2_gguf], trust, "SANs do not match")


def test_forgery_wrong_issuer(sign: Callable[..., Path], records: dict[str, Any], trust: dict[str, Path],
                              smollm2_gguf: Path) -> None:
    other_issuer = sign(attest.build_statement(records["low"]), issuer="https://issuer.example.test")
    _rejects(other_issuer, [smollm2_gguf], trust, "is not the pinned issuer")


def test_forgery_pinned_issuer_differs(low_bundle: Path, trust: dict[str, Path], smollm2_gguf: Path) -> None:
    google = SignerPolicy(issuer="https://accounts.google.com", repository=REPO, workflow=WORKFLOW, ref=MAIN)
    _rejects(low_bundle, [smollm2_gguf], trust, "is not the pinned issuer", policy=google)


def test_forgery_truncated_bundle(low_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                  smollm2_gguf: Path) -> None:
    text = low_bundle.read_text()
    truncated = tmp_path / "cut.sigstore.json"
    truncated.write_text(text[: len(text) * 2 // 3])
    _rejects(truncated, [smollm2_gguf], trust, "not a valid Sigstore bundle")


def test_forgery_bundle_for_another_artifact(low_bundle: Path, trust: dict[str, Path], shared_dir: Path) -> None:
    wheel = shared_dir / "test-vectors" / "sigstore" / "bundle_v3_github.whl"
    _rejects(low_bundle, [wheel], trust, "matches none of the given files")


def test_forgery_artifact_file_not_covered(low_bundle: Path, trust: dict[str, Path], smollm2_gguf: Path,
                                           shared_dir: Path) -> None:
    wheel = shared_dir / "test-vectors" / "sigstore" / "bundle_v3_github.whl"
    _rejects(low_bundle, [smollm2_gguf, wheel], trust, "not covered by the attestation")


def test_forgery_untrusted_root(low_bundle: Path, trust: dict[str, Path], smollm2_gguf: Path,
                                shared_dir: Path) -> None:
    production = shared_dir / "test-vectors" / "sigstore" / "prod_trusted_root.json"
    _rejects(low_bundle, [smollm2_gguf], trust, "signature verification failed", root=production)


def test_forgery_tampered_log_entry(low_bundle: Path, tmp_path: Path, trust: dict[str, Path],
                                    smollm2_gguf: Path) -> None:
    data = json.loads(low_bundle.read_text())
    entry = data["verificationMaterial"]["tlogEntries"][0]
    entry["integratedTime"] = str(int(entry["integratedTime"]) - 3600)  # back-dating breaks the SET
    forged = tmp_path / "backdated.sigstore.json"
    forged.write_text(json.dumps(data))
    _rejects(forged, [smollm2_gguf], trust, "signature verification failed")


def test_forgery_key_envelope_passed_as_keyless_bundle(tmp_path: Path, records: dict[str, Any], trust: dict[str, Path],
                                                       smollm2_gguf: Path) -> None:
    keys = attest.generate_key(tmp_path / "k.pem")
    envelope = tmp_path / "key-mode.json"
    envelope.write_text(attest.envelope_json(attest.sign_with_key(attest.build_statement(records["low"]),
                                                                  keys["private_key"])))
    _rejects(envelope, [smollm2_gguf], trust, "not a valid Sigstore bundle")


def test_cli_forged_bundle_exits_4(low_bundle: Path, tmp_path: Path, trust: dict[str, Path], smollm2_gguf: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    forged = _edit_payload(low_bundle, tmp_path, lambda s: s["predicate"]["screening"].update(band="HIGH"))
    assert main(["verify", str(forged), "--artifact", str(smollm2_gguf), "--issuer", GITHUB_ISSUER,
                 "--identity", IDENTITY, "--trusted-root", str(trust["root"])]) == 4
    err = capsys.readouterr().err
    assert "error[verification_failed]" in err and "signature verification failed" in err


# --------------------------------------------------------------------------- real Sigstore bundles


@pytest.fixture(scope="module")
def vectors(shared_dir: Path) -> Path:
    return shared_dir / "test-vectors" / "sigstore"


RFC8785 = SignerPolicy(issuer=GITHUB_ISSUER, repository="trailofbits/rfc8785.py",
                       workflow=".github/workflows/release.yml", ref="refs/tags/v0.1.2")


def test_production_bundle_verifies_offline_with_pinned_identity(vectors: Path) -> None:
    san = verify_artifact_signature(vectors / "bundle_v3_github.whl.sigstore", vectors / "bundle_v3_github.whl",
                                    RFC8785, trusted_root=vectors / "prod_trusted_root.json")
    assert san == "https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2"


def test_production_bundle_verifies_with_the_root_shipped_with_sigstore(vectors: Path) -> None:
    # No --trusted-root: sigstore's bundled production root, loaded offline (no TUF refresh).
    san = verify_artifact_signature(vectors / "bundle_v3_github.whl.sigstore", vectors / "bundle_v3_github.whl",
                                    RFC8785)
    assert san.endswith("/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2")


@pytest.mark.parametrize("policy, match", [
    (SignerPolicy(issuer=GITHUB_ISSUER, repository="mallory/rfc8785.py",
                  workflow=".github/workflows/release.yml", ref="refs/tags/v0.1.2"), "SANs do not match"),
    (SignerPolicy(issuer="https://accounts.google.com", repository="trailofbits/rfc8785.py",
                  workflow=".github/workflows/release.yml", ref="refs/tags/v0.1.2"), "is not the pinned issuer"),
], ids=["wrong-repository", "wrong-issuer"])
def test_production_bundle_rejected_for_wrong_signer(vectors: Path, policy: SignerPolicy, match: str) -> None:
    with pytest.raises(VerificationFailed, match=match):
        verify_artifact_signature(vectors / "bundle_v3_github.whl.sigstore", vectors / "bundle_v3_github.whl",
                                  policy, trusted_root=vectors / "prod_trusted_root.json")


def test_production_bundle_rejected_for_changed_artifact(vectors: Path, tmp_path: Path) -> None:
    changed = tmp_path / "bundle_v3_github.whl"
    changed.write_bytes((vectors / "bundle_v3_github.whl").read_bytes() + b"\x00")
    with pytest.raises(VerificationFailed, match="digest mismatch|Signature is invalid"):
        verify_artifact_signature(vectors / "bundle_v3_github.whl.sigstore", changed, RFC8785,
                                  trusted_root=vectors / "prod_trusted_root.json")


def test_production_bundle_is_not_a_quantsafe_attestation(vectors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(vectors / "bundle_v3_github.whl.sigstore"), "--artifact",
                 str(vectors / "bundle_v3_github.whl"), "--issuer", GITHUB_ISSUER,
                 "--repository", "trailofbits/rfc8785.py", "--workflow", ".github/workflows/release.yml",
                 "--ref", "refs/tags/v0.1.2", "--trusted-root", str(vectors / "prod_trusted_root.json")])
    assert code == 4 and "holds no DSSE envelope" in capsys.readouterr().err


def test_real_foreign_in_toto_statement_is_refused_by_predicate_type(vectors: Path, tmp_path: Path) -> None:
    # A genuinely signed in-toto statement (staging, Rekor v2 + TSA): sigstore accepts the
    # signature; our own check refuses a predicate that is not a quantsafe screening record.
    beacon = SignerPolicy(issuer=GITHUB_ISSUER, repository="sigstore-conformance/extremely-dangerous-public-oidc-beacon",
                          workflow=".github/workflows/extremely-dangerous-oidc-beacon.yml", ref="refs/heads/main")
    with pytest.raises(VerificationFailed, match="predicateType 'https://slsa.dev/provenance/v1'"):
        verify_keyless(vectors / "a.dsse.staging-rekor-v2.txt.sigstore.json", [vectors / "bundle_v3_github.whl"],
                       beacon, trusted_root=vectors / "staging_trusted_root.json")


# --------------------------------------------------------------------------- end to end with a real model


@pytest.mark.slow
def test_real_screening_signed_keyless_and_verified(qwen_q4_k_m_gguf: Path, qwen_ladder: dict[str, Path],
                                                    tmp_path: Path, fake: FakeSigstore,
                                                    trust: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """llama.cpp screens Qwen2.5-Coder Q4_K_M against the F16 dequantized from it; the record is signed and verified."""
    from pytest_quantsafe.policy import load_policy
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.screen import screen_models

    candidate = tmp_path / "candidate-Q4_K_M.gguf"
    if _same_fs(qwen_q4_k_m_gguf, tmp_path):
        os.link(qwen_q4_k_m_gguf, candidate)
    else:
        candidate.write_bytes(qwen_q4_k_m_gguf.read_bytes())
    result = screen_models(str(qwen_ladder["F16"]), [str(candidate)], policy=load_policy("default"),
                           probes=select(load_probes(), 12, 2), out_dir=tmp_path / "out",
                           engine_options={"threads": 1}, progress=False)[0]  # the machine's completion cache
    assert result.screening.baseline.n_refusals >= 5, "Qwen refuses most harmful probes (fixtures README)"
    band, rtsi, outcome = result.screening.band, result.screening.rtsi, result.verdict.outcome
    assert band is not None and rtsi is not None
    record_path = Path(result.paths["record"])
    bundle = tmp_path / f"{candidate.name}{attest.BUNDLE_SUFFIX}"
    assert main(["attest", str(record_path), "--artifact", str(candidate), "--keyless", "--trust-config",
                 str(trust["config"]), "--identity-token", fake.token(REPO, WORKFLOW, MAIN),
                 "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["verify", str(bundle), "--artifact", str(candidate), "--issuer", GITHUB_ISSUER, "--repository",
                 REPO, "--workflow", WORKFLOW, "--ref", MAIN, "--trusted-root", str(trust["root"])]) == 0
    out = capsys.readouterr().out
    assert "sha256:1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32" in out
    assert f"band:     {band} (RTSI {rtsi:.4f}), verdict {outcome}" in out


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev
