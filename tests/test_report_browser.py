"""report.html opened in a real browser: Debian's headless chromium, with and without JavaScript.

The run is a real multi-candidate screening: the refusal-tuned SmolLM2 ladder when that
fixture is already built on this machine (it is never built here: a 20-minute fine-tune),
else the packaged Qwen2.5-Coder-0.5B ladder (F16 baseline, Q8_0 and Q2_K) on the demo
subset, which the end-to-end tests generate into the machine's completion cache. The DOM
chromium dumps after its scripts ran is compared with the records and samples.jsonl.
``scripts/setup.sh test`` installs chromium (apt-get, as root).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from pytest_quantsafe.record.html import write_report
from pytest_quantsafe.record.run import load_run

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic")
URL_ATTRIBUTES = ("src", "href", "xlink:href", "action", "poster", "data", "srcset", "formaction")


def _chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if not found:
        pytest.skip("chromium is not installed: run scripts/setup.sh test as root (apt-get install chromium)")
    return found


def run_chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium on ``page`` with a fresh profile folder and ``extra`` flags."""
    profile.mkdir(parents=True)
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=180, check=False, cwd=profile)


def cdp_load(page: Path, profile: Path, *extra: str, timeout: float = 120) -> tuple[str, list[str]]:
    """Load ``page`` in chromium driven over ``--remote-debugging-pipe``; return the DOM and every requested URL.

    The DevTools DOM domain reads the document without running page script, so this also
    works with ``--blink-settings=scriptEnabled=false``, where ``--dump-dom`` prints nothing.
    """
    profile.mkdir(parents=True)
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()

    def fds() -> None:  # chromium reads commands on fd 3 and answers on fd 4 (copies first: no clobbering)
        commands, answers = os.dup(cmd_r), os.dup(res_w)
        os.dup2(commands, 3)
        os.dup2(answers, 4)

    proc = subprocess.Popen([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                             *extra, page.as_uri()], preexec_fn=fds,  # noqa: PLW1509 (the test runs one thread)
                            pass_fds=(3, 4, cmd_r, res_w),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=profile)
    os.close(cmd_r)
    os.close(res_w)
    buffer, events, counter, deadline = b"", [], [0], time.monotonic() + timeout

    def receive() -> dict[str, Any]:
        nonlocal buffer
        while b"\0" not in buffer:
            ready, _, _ = select.select([res_r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(res_r, 1 << 20) if ready else b""
            assert chunk, "chromium closed the DevTools pipe or timed out"
            buffer += chunk
        message, buffer = buffer.split(b"\0", 1)
        return dict(json.loads(message))

    def call(method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        counter[0] += 1
        message: dict[str, Any] = {"id": counter[0], "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            reply = receive()
            if reply.get("id") == counter[0]:
                assert "error" not in reply, reply
                return dict(reply.get("result") or {})
            events.append(reply)

    try:
        target = next(t["targetId"] for t in call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        call("Network.enable", session=session)
        call("Page.enable", session=session)
        call("Page.reload", {"ignoreCache": True}, session=session)  # now that requests are watched
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(receive())
        root = call("DOM.getDocument", {"depth": -1}, session=session)["root"]["nodeId"]
        html = str(call("DOM.getOuterHTML", {"nodeId": root}, session=session)["outerHTML"])
        call("Browser.close")
    finally:
        os.close(cmd_w)
        os.close(res_r)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return html, requests


class Dom(HTMLParser):
    """The parts of the dumped DOM the tests read: ladder rows, probe rows, every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rungs: list[dict[str, str]] = []
        self.probes: dict[str, list[dict[str, str]]] = {}
        self.urls: list[str] = []
        self.filters: list[dict[str, str | None]] = []
        self._table: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in URL_ATTRIBUTES and v]
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and "rung" in (a.get("class") or "").split():
            self.rungs.append({"candidate": a["data-candidate"] or "", "band": a["data-band"] or "",
                               "rtsi": a["data-rtsi"] or "", "band_text": "", "rtsi_text": ""})
        elif tag == "tr" and "probe" in (a.get("class") or "").split() and self._table:
            self.probes.setdefault(self._table, []).append({**{k: v or "" for k, v in a.items()},
                                                            "hidden": "hidden" in a})  # type: ignore[dict-item]
        elif tag == "div" and "filters" in (a.get("class") or "").split():
            self.filters.append(a)
        elif tag == "span" and "band-cell" in (a.get("class") or "").split():
            self._cell = "band_text"
        elif tag == "td" and "rtsi-cell" in (a.get("class") or "").split():
            self._cell = "rtsi_text"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "td"):
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell and self.rungs:
            self.rungs[-1][self._cell] += data.strip()


def _dom(text: str) -> Dom:
    dom = Dom()
    dom.feed(text)
    return dom


@pytest.fixture(scope="module")
def screened_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the output folder of a real multi-candidate screening with its report.html written."""
    from pytest_quantsafe import zoo
    from pytest_quantsafe.cli.screen import DEMO_BENIGN, DEMO_HARMFUL, DEMO_LADDERS
    from pytest_quantsafe.engines.cache import default_root
    from pytest_quantsafe.policy import load_policy
    from pytest_quantsafe.probes import load_probes, select
    from pytest_quantsafe.screen import screen_models

    source = zoo.REFUSER if zoo.variant_path(zoo.REFUSER, "F16").is_file() else "qwen"
    rungs = DEMO_LADDERS[source][1]
    ladder = [zoo.build_variant(source, quant) for quant in rungs]
    out = tmp_path_factory.mktemp("report-run")
    screen_models(str(ladder[0]), [str(p) for p in ladder[1:]], policy=load_policy("default"),
                  probes=select(load_probes(), DEMO_HARMFUL, DEMO_BENIGN), out_dir=out,
                  engine_options={"threads": 1}, cache_dir=default_root(), progress=False)
    write_report(out)
    return out


def _records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in out.glob("*/record.json")}


def test_report_in_chromium_matches_the_records(screened_run: Path, tmp_path: Path) -> None:
    page = screened_run / "report.html"
    records = _records(screened_run)
    assert len(records) >= 2, "a multi-candidate run"
    proc = run_chromium(page, tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = _dom(proc.stdout)
    assert sorted(r["candidate"] for r in dom.rungs) == sorted(records)  # one row per candidate
    assert [r["candidate"] for r in dom.rungs] == [e.name for e in load_run(screened_run)]  # quantization order
    for row in dom.rungs:
        screening = records[row["candidate"]]["screening"]
        assert row["band"] == (screening["band"] or "none") and row["band_text"].startswith(row["band"])
        if screening["rtsi"] is None:  # insufficient data: no RTSI is shown, never a number
            assert row["rtsi"] == "" and row["rtsi_text"] == "–"
        else:
            assert float(row["rtsi"]) == pytest.approx(screening["rtsi"], abs=1e-9)
            assert row["rtsi_text"] == f"{screening['rtsi']:.4f}"
    for name in records:
        samples = screened_run / name / "samples.jsonl"
        if samples.is_file():
            rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line]
            shown = next(v for k, v in dom.probes.items() if k.endswith(name.replace(".", "-")))
            assert len(shown) == len(rows)
            assert sorted(r["data-flip"] for r in shown) == sorted(r["flip"] for r in rows)
    assert dom.filters and all("hidden" not in f for f in dom.filters) if dom.probes else True  # JS ran
    external = [u for u in dom.urls if u.lower().startswith(("http:", "https:", "//", "ftp:"))]
    assert not external, external
    assert "<link" not in proc.stdout and "@import" not in proc.stdout and "url(http" not in proc.stdout
    shot = tmp_path / "report.png"
    proc = run_chromium(page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000")
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_request_leaves_the_page(screened_run: Path, tmp_path: Path) -> None:
    """Every request the browser makes while loading the page (scripts on) is the page's own file."""
    html, requests = cdp_load(screened_run / "report.html", tmp_path / "profile")
    assert requests == [(screened_run / "report.html").as_uri()]
    assert len(_dom(html).rungs) == len(_records(screened_run))


def test_report_without_javascript_still_shows_the_table_and_bands(screened_run: Path, tmp_path: Path) -> None:
    html, requests = cdp_load(screened_run / "report.html", tmp_path / "profile",
                              "--blink-settings=scriptEnabled=false")
    assert requests == [(screened_run / "report.html").as_uri()]
    dom = _dom(html)
    records = _records(screened_run)
    assert {r["candidate"]: r["band_text"] for r in dom.rungs} == {
        name: rec["screening"]["band"] or "none (insufficient data)" for name, rec in records.items()}
    assert all("hidden" in f for f in dom.filters)  # the filters need script; without it they stay hidden
    for rows in dom.probes.values():
        assert not any(r["hidden"] for r in rows)  # and every probe row is shown
