"""The ``quant_safety`` fixture's machinery: what to screen, session-cached results, assertions.

No scoring happens here: real models go through ``screen.screen_models`` (the
baseline generated once for every candidate), external-screen manifests through
``manifest`` + ``screen.screen_profiles``, and the policy's ``decide`` gives the
verdict. This module turns results into assertions and into the compact failure
table a CI log shows, and remembers one summary row per candidate for the
terminal report.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pytest_quantsafe._util import UNSAFE_NAME_CHARS as _UNSAFE_ID
from pytest_quantsafe._util import text_table
from pytest_quantsafe.attest import sign as attest
from pytest_quantsafe.errors import UsageError, from_exception
from pytest_quantsafe.measure.paired import detectable_text, evidence_line, lost_refusals_text
from pytest_quantsafe.policy import load_policy, refusal_drop_pp
from pytest_quantsafe.probes import load_probes
from pytest_quantsafe.record import manifest
from pytest_quantsafe.record.check import check_record
from pytest_quantsafe.results import Policy, ScreeningResult
from pytest_quantsafe.screen import output_names, screen_models, screen_profiles
from pytest_quantsafe.types import BANDS, LIMITS_SENTENCE, Artifact, Band

_REMOTE = ("http://", "https://", "hf://")


class QuantSafetyFailure(AssertionError):
    """A quant_safety assertion failed; the message is the compact failure table."""


@dataclass(frozen=True)
class Subject:
    """One candidate to screen: a model reference or an external-screen manifest file."""

    ref: str
    kind: Literal["model", "manifest"]

    @property
    def id(self) -> str:
        """Return the test id: the artifact's file or folder name, made safe."""
        return _UNSAFE_ID.sub("_", self.ref.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or self.ref)


@dataclass
class GateOptions:
    """The plugin's settings after command line, environment and ini file were merged."""

    baseline: str | None = None
    candidates: tuple[str, ...] = ()
    manifests: tuple[str, ...] = ()
    policy: str = "default"
    probes: str | None = None
    out: Path | None = None
    engine: str = "auto"
    threads: int | None = None
    sign: bool = False
    #: With signing on: a local key (EC P-256 / Ed25519 PEM) for DSSE; None = Sigstore keyless.
    sign_key: str | None = None
    #: Typed engine options (engines/options.py), e.g. {"digest": ..., "concurrency": 8}.
    engine_options: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Return True when any quantsafe setting was given (else the plugin stays idle)."""
        return bool(self.baseline or self.candidates or self.manifests or self.out or self.sign
                    or self.policy != "default" or self.probes)


def expand_refs(values: Sequence[str], what: str) -> tuple[str, ...]:
    """Return the references with globs expanded (sorted); a glob that matches nothing is an error."""
    out: list[str] = []
    for value in values:
        if value.startswith(_REMOTE) or not glob.has_magic(value):
            out.append(value)
            continue
        matches = sorted(glob.glob(value))
        if not matches:
            raise UsageError(f"{what} pattern {value!r} matches no file", where=value,
                             fix="check the path or quote the pattern so your shell does not expand it")
        out.extend(matches)
    return tuple(dict.fromkeys(out))


@dataclass
class QuantSafetySession:
    """Per pytest session: the configured subjects and every screening done, cached."""

    options: GateOptions
    policy: Policy
    results: dict[tuple[str, str], ScreeningResult] = field(default_factory=dict)
    #: (subject id, policy, result) in the order screened, for the terminal summary.
    rows: list[tuple[str, Policy, ScreeningResult]] = field(default_factory=list)
    _policies: dict[str, Policy] = field(default_factory=dict)

    def subjects(self) -> list[Subject]:
        """Return the candidates to screen: model references, then manifests."""
        return ([Subject(ref, "model") for ref in self.options.candidates]
                + [Subject(ref, "manifest") for ref in self.options.manifests])

    def load_policy(self, ref: str | None) -> Policy:
        """Return the session policy, or the policy ``ref`` names (cached)."""
        if ref is None:
            return self.policy
        if ref not in self._policies:
            self._policies[ref] = load_policy(ref)
        return self._policies[ref]

    def result(self, subject: Subject, policy: Policy) -> ScreeningResult:
        """Return the screening of ``subject`` under ``policy``, screening it on first use."""
        key = (subject.ref, policy.digest)
        if key not in self.results:
            if subject.kind == "manifest":
                self._store(subject, policy, self._screen_manifest(subject, policy))
            else:
                self._screen_models(subject, policy)
        return self.results[key]

    def _store(self, subject: Subject, policy: Policy, result: ScreeningResult) -> None:
        self.results[(subject.ref, policy.digest)] = result
        self.rows.append((subject.id, policy, result))

    def _screen_models(self, subject: Subject, policy: Policy) -> None:
        if not self.options.baseline:
            raise UsageError("no baseline to screen the candidate against", where=subject.ref,
                             fix="pass --quantsafe-baseline (or QUANTSAFE_BASELINE / quantsafe_baseline in ini)")
        # Screen every configured model candidate not yet done under this policy in one call:
        # the baseline is generated (or read from the cache) once for all of them.
        pending = [s for s in self.subjects() if s.kind == "model" and (s.ref, policy.digest) not in self.results]
        if subject not in pending:
            pending = [subject]
        probes = load_probes(self.options.probes) if self.options.probes else None
        engine_options = {**self.options.engine_options,
                          **({"threads": self.options.threads} if self.options.threads else {})}
        results = screen_models(self.options.baseline, [s.ref for s in pending], policy=policy, probes=probes,
                                out_dir=self.options.out, engine=self.options.engine,
                                engine_options=engine_options, progress=False)
        for s, result in zip(pending, results):
            self._store(s, policy, self._signed(result))

    def _screen_manifest(self, subject: Subject, policy: Policy) -> ScreeningResult:
        request = manifest.load_request(subject.ref)
        baseline_profile, candidate_profile = manifest.profiles_from_request(request)
        # The candidate's ref is the manifest path, so its outputs land in OUT/<manifest file name>/.
        sides = [Artifact(ref=subject.ref if role == "candidate" else f"{subject.ref}#baseline",
                          format="external-screen", files=(), quantization=str(request[role]["quantization"]),
                          name=str(request[role]["repo_id"]),
                          metadata={"revision": str(request[role]["revision"]), "manifest": subject.ref})
                 for role in ("baseline", "candidate")]
        # Folder names are distinct over every configured manifest (two req.json in two folders).
        refs = dict.fromkeys([*self.options.manifests, subject.ref])
        names = output_names([Artifact(ref=r, format="external-screen", files=(), quantization="", name=r)
                              for r in refs])
        result = screen_profiles(baseline_profile, candidate_profile, policy=policy, baseline_artifact=sides[0],
                                 candidate_artifact=sides[1], out_dir=self.options.out, out_name=names[subject.ref])
        return self._signed(result)

    def _signed(self, result: ScreeningResult) -> ScreeningResult:
        """Return the result with its record signed (``paths["signature"]``) when signing is on."""
        if not self.options.sign:
            return result
        from dataclasses import replace


        record_path = result.paths.get("record")
        if not record_path:
            raise UsageError("signing needs the written record", fix="pass --quantsafe-out DIR with --quantsafe-sign")

        check_record(result.record, where=record_path)  # never sign a record that would not verify
        statement = attest.build_statement(result.record)
        if self.options.sign_key:
            out = Path(record_path).with_name("record.dsse.json")
            text = attest.envelope_json(attest.sign_with_key(statement, self.options.sign_key))
        else:
            import os

            out = Path(record_path).with_name("record.sigstore.json")
            text = attest.sign_keyless(statement, identity_token=os.environ.get("SIGSTORE_IDENTITY_TOKEN") or None)
        out.write_text(text, encoding="utf-8")
        return replace(result, paths={**result.paths, "signature": str(out)})


# --------------------------------------------------------------------------- the fixture object


def record_band(result: ScreeningResult) -> Band | None:
    """Return the band the record stores (the effective band, decided once by ``policy.effective_band``)."""
    band: Band | None = result.record["screening"]["band"]
    return band


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def failure_table(result: ScreeningResult, policy: Policy, broken: Sequence[str], title: str) -> str:
    """Return the compact failure message: band, RTSI with contributions, rates, broken rule, limits."""
    s = result.screening
    b, c = s.baseline, s.candidate
    band = record_band(result) or "none (insufficient data)"
    rtsi = f"{s.rtsi:.4f}" if s.rtsi is not None else "n/a"
    parts = " + ".join(f"{k} {v:.4f}" for k, v in s.contributions.items()) or "not scored"
    lines = [
        title,
        (f"  band      {band}   (fail_at {policy.fail_at}; bands {policy.bands.moderate:g}/{policy.bands.high:g}; "
         f"policy {policy.name})"),
        f"  RTSI      {rtsi} = {parts}",
        (f"  refusals  baseline {b.n_refusals}/{b.n_total} {_pct(b.refusal_rate)} "
         f"[{_pct(b.refusal_rate_ci[0])}, {_pct(b.refusal_rate_ci[1])}]  candidate {c.n_refusals}/{c.n_total} "
         f"{_pct(c.refusal_rate)} [{_pct(c.refusal_rate_ci[0])}, {_pct(c.refusal_rate_ci[1])}]  "
         f"drop {refusal_drop_pp(s):.1f} pp"),
        f"  paired    {evidence_line(s.paired)}",
        f"  flags     {', '.join(s.flags) or 'none'}",
    ]
    lines += [f"  broken    {r}" for r in broken]
    if result.paths.get("record"):
        lines.append(f"  record    {result.paths['record']}")
    lines.append(f"  {LIMITS_SENTENCE}")
    return "\n".join(lines)


class QuantSafety:
    """The ``quant_safety`` fixture: screen a candidate and assert on it under a policy."""

    def __init__(self, session: QuantSafetySession, subject: Subject | None, policy: Policy,
                 record_property: Callable[[str, object], None]) -> None:
        self._session = session
        self._subject = subject
        self.policy = policy
        self._record_property = record_property

    def screen(self, candidate: str | None = None) -> ScreeningResult:
        """Return the (session-cached) screening result of the test's candidate, or of ``candidate``."""
        __tracebackhide__ = True
        subject = self._subject
        if candidate is not None:
            kind: Literal["model", "manifest"] = "manifest" if candidate.endswith(".json") else "model"
            subject = Subject(candidate, kind)
        try:
            if subject is None:
                raise UsageError("no candidate configured for quant_safety",
                                 fix="pass --quantsafe-candidate (or --quantsafe-manifest), set "
                                 "QUANTSAFE_CANDIDATES, or use @pytest.mark.quant_safety(candidate=...)")
            result = self._session.result(subject, self.policy)
        except Exception as exc:  # noqa: BLE001  # a third-party failure is typed too (errors.from_exception)
            # Fail closed and readable: the screening could not be done, so the gate cannot pass.
            error = from_exception(exc, f"screening {subject.id if subject else 'no candidate'}")
            raise QuantSafetyFailure(f"{error.diagnostics()}\n  {LIMITS_SENTENCE}") from None
        s = result.screening
        tag = f"[{subject.id}]"
        self._record_property(f"quantsafe_rtsi{tag}", "" if s.rtsi is None else f"{s.rtsi:.4f}")
        self._record_property(f"quantsafe_band{tag}", self._band(result) or "")
        self._record_property(f"quantsafe_verdict{tag}", result.verdict.outcome)
        block = s.paired or {}
        self._record_property(f"quantsafe_lost_refusals{tag}", lost_refusals_text(s.paired))
        self._record_property(f"quantsafe_mcnemar_p{tag}", "" if not block else f"{float(block['mcnemar_p_harmful']):.4f}")
        self._record_property(f"quantsafe_detectable{tag}", detectable_text(s.paired) if block else "")
        self._record_property(f"quantsafe_record{tag}", result.paths.get("record", ""))
        if result.paths.get("signature"):
            self._record_property(f"quantsafe_signature{tag}", result.paths["signature"])
        return result

    def _band(self, result: ScreeningResult) -> Band | None:
        return record_band(result)

    def _fail(self, result: ScreeningResult, broken: Sequence[str], what: str) -> None:
        __tracebackhide__ = True
        name = self._subject.id if self._subject else result.candidate.name
        raise QuantSafetyFailure(failure_table(result, self.policy, broken, f"quantsafe: {name} {what}"))

    def assert_passes(self) -> ScreeningResult:
        """Return the result when the whole policy passes; raise the failure table otherwise."""
        __tracebackhide__ = True
        result = self.screen()
        verdict = result.verdict
        if verdict.outcome != "pass":
            what = ("has insufficient data (exit 3)" if verdict.outcome == "insufficient"
                    else "failed the policy (exit 1)")
            self._fail(result, verdict.reasons, what)
        return result

    def assert_band_below(self, band: str) -> ScreeningResult:
        """Return the result when the candidate's band is below ``band``; fail closed without a band."""
        __tracebackhide__ = True
        if band not in BANDS:
            raise UsageError(f"unknown band {band!r}", fix=f"use one of {', '.join(BANDS)}")
        result = self.screen()
        got = self._band(result)
        if got is None or BANDS.index(got) >= BANDS.index(band):
            self._fail(result, [f"band {got or 'not established'} is not below {band}"], f"band not below {band}")
        return result

    def assert_refusal_drop_at_most(self, pp: float) -> ScreeningResult:
        """Return the result when the refusal rate fell by at most ``pp`` percentage points."""
        __tracebackhide__ = True

        result = self.screen()
        drop = refusal_drop_pp(result.screening)
        if not drop <= pp + 1e-9:
            self._fail(result, [f"refusal rate drop {drop:.1f} pp exceeds {pp:g} pp"], "refusal rate dropped")
        return result

    def assert_no_flags(self) -> ScreeningResult:
        """Return the result when the screening raised no flag at all."""
        __tracebackhide__ = True
        result = self.screen()
        if result.screening.flags:
            self._fail(result, [f"flags raised: {', '.join(result.screening.flags)}"], "raised flags")
        return result


def summary_lines(session: QuantSafetySession) -> list[str]:
    """Return the terminal summary: one row per screened candidate, then the limits sentence."""
    rows = [("candidate", "policy", "band", "RTSI", "refusals base->cand", "verdict", "record")]
    for sid, policy, r in session.rows:
        s = r.screening
        rows.append((sid, policy.name, record_band(r) or "-",
                     "-" if s.rtsi is None else f"{s.rtsi:.4f}",
                     f"{_pct(s.baseline.refusal_rate)}->{_pct(s.candidate.refusal_rate)}",
                     r.verdict.outcome, r.paths.get("record", "-")))
    return text_table(rows) + [LIMITS_SENTENCE]

