"""The pytest plugin: options, the ``quant_safety`` fixture, its marker and the report hooks.

Registered through the ``pytest11`` entry point. It holds no scoring logic: the
fixture's machinery lives in ``gate_fixture`` (imported only when used), which
delegates to ``screen`` and ``policy``. Every option is also an ini key and an
environment variable (command line > environment > ini). A session that uses no
quantsafe option imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_quantsafe.errors import QuantSafeError, UsageError

if TYPE_CHECKING:  # the gate is imported when a test uses it: it pulls in the whole pipeline
    from pytest_quantsafe.plugin.gate import QuantSafety, QuantSafetySession, Subject

#: (ini name, command-line flag, environment variable, kind, help); kind: str, list, int, bool.
OPTIONS: tuple[tuple[str, str, str, str, str], ...] = (
    ("quantsafe_baseline", "--quantsafe-baseline", "QUANTSAFE_BASELINE", "str",
     "full-precision baseline model (GGUF file, HF folder, hf://org/repo@rev, http(s)://host/v1#model)"),
    ("quantsafe_candidates", "--quantsafe-candidate", "QUANTSAFE_CANDIDATES", "list",
     "quantized candidate to screen; repeat for several, globs allowed (env: newline/space separated)"),
    ("quantsafe_policy", "--quantsafe-policy", "QUANTSAFE_POLICY", "str",
     "policy YAML path or packaged name (default, strict, advisory); default: default"),
    ("quantsafe_probes", "--quantsafe-probes", "QUANTSAFE_PROBES", "str",
     "probe set (JSONL or AdvBench/HarmBench/JailbreakBench CSV); default: the policy's, else the shipped set"),
    ("quantsafe_out", "--quantsafe-out", "QUANTSAFE_OUT", "str",
     "folder for records: OUT/<candidate>/record.json, card.yaml, summary.md"),
    ("quantsafe_engine", "--quantsafe-engine", "QUANTSAFE_ENGINE", "str",
     "engine: auto (from the reference), gguf, hf or openai; default: auto"),
    ("quantsafe_threads", "--quantsafe-threads", "QUANTSAFE_THREADS", "int",
     "CPU threads for the engine"),
    ("quantsafe_engine_options", "--quantsafe-engine-option", "QUANTSAFE_ENGINE_OPTIONS", "list",
     "engine option KEY=VALUE, repeatable (env: newline/comma separated); secrets via api_key_env=NAME"),
    ("quantsafe_manifest", "--quantsafe-manifest", "QUANTSAFE_MANIFEST", "list",
     "external-screen manifest (precomputed refusal profiles) to screen as a candidate; repeatable"),
    ("quantsafe_sign", "--quantsafe-sign", "QUANTSAFE_SIGN", "bool",
     "sign each written record with Sigstore keyless (ambient CI identity); needs --quantsafe-out"),
    ("quantsafe_sign_key", "--quantsafe-sign-key", "QUANTSAFE_SIGN_KEY", "str",
     "sign each written record as a DSSE envelope with this local EC P-256 / Ed25519 key (air-gapped)"),
)

_SESSION_KEY: pytest.StashKey[QuantSafetySession] = pytest.StashKey()
_RECORDED_KEY: pytest.StashKey[set[tuple[str, str]]] = pytest.StashKey()
_REMOTE = ("http://", "https://", "hf://")
_PATH_OPTIONS = {"quantsafe_baseline", "quantsafe_candidates", "quantsafe_probes", "quantsafe_out", "quantsafe_sign_key",
                 "quantsafe_manifest", "quantsafe_policy"}


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add the quantsafe options (command line and ini)."""
    group = parser.getgroup("quantsafe", "quantsafe: refusal-drift release gate for quantized models")
    for ini, flag, env, kind, help_text in OPTIONS:
        full_help = f"{help_text} [env {env}, ini {ini}]"
        if kind == "bool":
            group.addoption(flag, action="store_true", default=None, dest=ini, help=full_help)
            parser.addini(ini, full_help, type="bool", default=False)
        elif kind == "list":
            group.addoption(flag, action="append", default=None, dest=ini, help=full_help)
            parser.addini(ini, full_help, type="linelist", default=[])
        else:
            group.addoption(flag, action="store", default=None, dest=ini, help=full_help)
            parser.addini(ini, full_help, type="string", default="")


def _anchor(value: str, base: Path | None) -> str:
    """Return an ini-file path made relative to the ini file's folder (not remote refs or names)."""
    if base is None or value.startswith(_REMOTE) or Path(value).is_absolute():
        return value
    if "/" not in value and not value.endswith((".yaml", ".yml", ".gguf", ".json", ".jsonl", ".csv", ".pem")):
        return value  # a packaged name, an engine name
    return str(base / value)


def _setting(config: pytest.Config, ini: str, env: str, kind: str) -> Any:
    """Return one setting: command line, else environment, else ini file, else None."""
    cli = config.getoption(ini)
    if cli not in (None, [], ""):
        return cli
    raw = os.environ.get(env, "").strip()
    if raw:
        if ini == "quantsafe_engine_options":
            from pytest_quantsafe.engines.options import split_option_list

            return split_option_list(raw)
        if kind == "list":
            return raw.split()
        if kind == "bool":
            return raw.lower() in ("1", "true", "yes", "on") or None
        return raw
    value = config.getini(ini)
    base = config.inipath.parent if config.inipath else None
    if kind == "list":
        return [_anchor(v, base) if ini in _PATH_OPTIONS else v for v in value] or None
    if kind == "bool":
        return bool(value) or None
    value = str(value).strip()
    if not value:
        return None
    return _anchor(value, base) if ini in _PATH_OPTIONS else value


def _build_session(config: pytest.Config) -> QuantSafetySession:
    from pytest_quantsafe.plugin.gate import GateOptions, QuantSafetySession, expand_refs

    got = {ini: _setting(config, ini, env, kind) for ini, _flag, env, kind, _help in OPTIONS}
    try:
        threads = int(got["quantsafe_threads"]) if got["quantsafe_threads"] else None
    except ValueError:
        raise pytest.UsageError(f"error[usage]: --quantsafe-threads must be an integer, got "
                                f"{got['quantsafe_threads']!r}") from None
    try:
        from pytest_quantsafe.engines.options import parse_engine_options

        engine = got["quantsafe_engine"] or "auto"
        options = GateOptions(
            baseline=got["quantsafe_baseline"],
            candidates=expand_refs(got["quantsafe_candidates"] or (), "candidate"),
            manifests=expand_refs(got["quantsafe_manifest"] or (), "manifest"),
            policy=got["quantsafe_policy"] or "default",
            probes=got["quantsafe_probes"],
            out=Path(got["quantsafe_out"]) if got["quantsafe_out"] else None,
            engine=got["quantsafe_engine"] or "auto",
            threads=threads,
            sign=bool(got["quantsafe_sign"] or got["quantsafe_sign_key"]),
            sign_key=got["quantsafe_sign_key"],
            engine_options=parse_engine_options(engine, got["quantsafe_engine_options"] or (),
                                                where="--quantsafe-engine-option"),
        )
        if options.sign and options.out is None:
            raise UsageError("--quantsafe-sign signs the written records", fix="add --quantsafe-out DIR")
        from pytest_quantsafe.policy import load_policy

        policy = load_policy(options.policy)
        _preflight(options)
        return QuantSafetySession(options, policy)
    except QuantSafeError as exc:
        # A bad policy or option is a usage error of the whole run, not a failing test.
        raise pytest.UsageError(exc.diagnostics()) from None


def _preflight(options: Any) -> None:
    """Resolve every input and output path now: a bad one is a usage error of the run (pytest exit 4)."""
    from pytest_quantsafe._util import check_writable
    from pytest_quantsafe.engines.base import preflight
    from pytest_quantsafe.probes import load_probes

    for ref in ([options.baseline] if options.baseline else []) + list(options.candidates):
        preflight(ref, options.engine)
    if options.probes:
        load_probes(options.probes)
    for ref in options.manifests:
        from pytest_quantsafe.record.manifest import load_request

        load_request(ref)
    if options.out is not None:
        check_writable(options.out, "--quantsafe-out", folder=True)
    if options.sign_key:
        from pytest_quantsafe._util import safe_path

        safe_path(options.sign_key, "signing key")


def _session(config: pytest.Config) -> QuantSafetySession:
    session = config.stash.get(_SESSION_KEY, None)
    if session is None:
        session = config.stash[_SESSION_KEY] = _build_session(config)
    return session


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker; validate settings and the policy up front when quantsafe is used."""
    config.addinivalue_line(
        "markers",
        "quant_safety(policy=None, candidate=None): screen with this policy (path or packaged name) "
        "and/or this candidate instead of the session's",
    )
    if any(_setting(config, ini, env, kind) for ini, _flag, env, kind, _help in OPTIONS):
        _session(config)


def _marker_ref(item_path: Path, value: str) -> str:
    """Return a marker's path relative to the test file's folder (names and remote refs unchanged)."""
    return _anchor(value, item_path.parent)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give every test using quant_safety one item per configured candidate (ids = artifact names)."""
    if "quant_safety" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("quant_safety")
    if marker is not None and marker.kwargs.get("candidate"):
        return
    session = metafunc.config.stash.get(_SESSION_KEY, None)
    subjects = session.subjects() if session is not None else []
    if subjects:
        metafunc.parametrize("quantsafe_subject", subjects, ids=[s.id for s in subjects])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Validate every policy a quant_safety marker names before any test runs."""
    from_markers = [(item, m.kwargs["policy"]) for item in items
                    for m in [item.get_closest_marker("quant_safety")] if m is not None and m.kwargs.get("policy")]
    if not from_markers:
        return

    session = _session(config)
    for item, ref in from_markers:
        try:
            session.load_policy(_marker_ref(item.path, str(ref)))
        except QuantSafeError as exc:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.quant_safety policy\n{exc.diagnostics()}") from None


@pytest.fixture
def quantsafe_subject() -> Subject | None:
    """Return the candidate this test item screens (parametrized by the plugin; None when unset)."""
    return None


def _suite_recorder(config: pytest.Config, record_testsuite_property: Any) -> Any:
    """Return ``record(name, value)`` writing each property once as a JUnit suite property.

    Suite properties are what the xunit2 schema (pytest's default ``junit_family``)
    accepts; per-test ``record_property`` warns under it. Names carry the candidate
    (``quantsafe_rtsi[<candidate>]``), and a candidate screened by several tests is
    written once.
    """
    seen: set[tuple[str, str]] = config.stash.setdefault(_RECORDED_KEY, set())

    def record(name: str, value: object) -> None:
        if (name, str(value)) not in seen:
            seen.add((name, str(value)))
            record_testsuite_property(name, value)

    return record


@pytest.fixture
def quant_safety(request: pytest.FixtureRequest, quantsafe_subject: Subject | None,
                 record_testsuite_property: Any) -> QuantSafety:
    """Return the QuantSafety helper: ``screen()`` and policy-driven assertions, cached per session."""
    from pytest_quantsafe.plugin.gate import QuantSafety, Subject

    session = _session(request.config)
    policy, subject = session.policy, quantsafe_subject
    marker = request.node.get_closest_marker("quant_safety")
    if marker is not None:
        if marker.kwargs.get("policy"):
            policy = session.load_policy(_marker_ref(request.node.path, str(marker.kwargs["policy"])))
        if marker.kwargs.get("candidate"):
            ref = _marker_ref(request.node.path, str(marker.kwargs["candidate"]))
            subject = Subject(ref, "manifest" if ref.endswith(".json") else "model")
    return QuantSafety(session, subject, policy, _suite_recorder(request.config, record_testsuite_property))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Add a "quantsafe" section with one row per screened candidate."""
    session = config.stash.get(_SESSION_KEY, None)
    if session is None or not session.rows:
        return
    from pytest_quantsafe.plugin.gate import summary_lines

    terminalreporter.section("quantsafe")
    for line in summary_lines(session):
        terminalreporter.write_line(line)
    if session.options.out is not None:
        from pytest_quantsafe.errors import QuantSafeError
        from pytest_quantsafe.record.html import write_report

        try:
            terminalreporter.write_line(f"quantsafe report: {write_report(session.options.out)}")
        except (QuantSafeError, OSError) as exc:  # the records are written; the page is a view of them
            terminalreporter.write_line(f"quantsafe: report.html not written (the records are): {exc}")
