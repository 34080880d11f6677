"""The web page in a real browser: Debian's chromium driven by Playwright, against a real
`receiver serve` (TLS, the page on its own port) fed by the simulator.

One browser and one server for the module. ``--screenshots docs`` saves the README's
screenshots (the login page, the list with a live stream, a stream's page) to docs/.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from receiver import simulate, tls
from receiver.codecs import CLI_CODECS, codec_for
from tests.support.audio import Speech
from tests.support.commands import env_with, free_port, receiver_cmd, run_receiver
from tests.support.receiver import TOKEN, TlsFiles
from tests.support.server_process import ServerProcess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # The test plays audio without a click on the page.
    "--autoplay-policy=no-user-gesture-required",
]
GAP_SID = "MZ-gap-and-dtmf-0001"
LIVE_SID = "MZ-live-0004"
# Chunks 60..84 of the inbound track are lost: 0.5 s of silence from 1.18 s.
GAP_FRAMES = range(60, 85)
VIEWPORT = {"width": 1280, "height": 860}


@dataclass
class Site:
    """The served receiver: its page's base URL, its stream URL and its files."""

    served: ServerProcess
    base: str
    stream_url: str
    recordings: Path
    cert: Path
    live_wav: Path
    screenshots: Path

    def record(self, directory: str) -> dict[str, Any]:
        return dict(json.loads((self.recordings / directory / "stream.json").read_text()))


def _play(site_url: str, cert: Path, messages: list[str]) -> None:
    result = asyncio.run(
        simulate.play(site_url, messages, token=TOKEN, ssl_context=tls.client_context(cert))
    )
    assert result.close_code == 1000, result


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    tls_files: TlsFiles,
    speech: dict[str, Speech],
    request: pytest.FixtureRequest,
) -> Iterator[Site]:
    """`receiver serve` with the page on, and three finished streams (one with a gap and DTMF)."""
    root = tmp_path_factory.mktemp("web")
    option = request.config.getoption("--screenshots")
    screenshots = Path(option) if option else root / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    ui_port = free_port()
    served = ServerProcess(
        root,
        {
            "RECEIVER_TOKENS": TOKEN,
            "RECEIVER_TLS_CERT": str(tls_files.cert),
            "RECEIVER_TLS_KEY": str(tls_files.key),
            "RECEIVER_UI_PORT": str(ui_port),
            "RECEIVER_STEREO": "true",
            "RECEIVER_RECORDINGS_DIR": str(root / "recordings"),
        },
    )
    log = served.wait_listening()
    assert f"web page on https://127.0.0.1:{ui_port}/" in log
    stream_url = f"wss://localhost:{served.port}"
    codec = codec_for(CLI_CODECS["pcmu"])
    tracks = {track: codec.encode(speech[track].samples(8000)) for track in ("inbound", "outbound")}
    gap = simulate.build_messages(
        codec=codec,
        tracks=tracks,
        stream_sid=GAP_SID,
        custom_parameters={"room": "42", "caller": "alice"},
        drop={"inbound": GAP_FRAMES},
    )
    mark = json.dumps({"event": "mark", "mark": {"name": "greeting-done"}})
    gap.insert(len(gap) * 3 // 4, mark)
    dtmf = {"event": "dtmf", "sequenceNumber": "9000", "dtmf": {"digit": "5", "duration": 200}}
    gap.insert(len(gap) // 2, json.dumps(dtmf))
    _play(f"{stream_url}/sales", tls_files.cert, gap)
    for sid, params in (("MZ-other-0002", {"room": "7"}), ("MZ-third-0003", {})):
        messages = simulate.build_messages(
            codec=codec, tracks=tracks, stream_sid=sid, custom_parameters=params
        )
        _play(f"{stream_url}/support", tls_files.cert, messages)
    # One stream uploaded by delivery's backfill command, to a file:// object store.
    upload = run_receiver(
        "upload",
        str(root / "recordings" / "MZ-other-0002"),
        cwd=root,
        env=env_with(RECEIVER_UPLOAD_URL=f"file://{root / 'store'}"),
    )
    assert upload.returncode == 0, upload.stdout + upload.stderr
    # A live stream of about 9 s: the two sentences, one after the other, on each track.
    live_wav = root / "live.wav"
    live_out = root / "live-out.wav"
    first, second = speech["inbound"].samples(8000), speech["outbound"].samples(8000)
    soundfile.write(live_wav, np.concatenate([first, second]), 8000, subtype="PCM_16")
    soundfile.write(live_out, np.concatenate([second, first]), 8000, subtype="PCM_16")
    # A file of the recordings directory that points outside it: never served.
    (root / "recordings" / GAP_SID / "leak.wav").symlink_to("/etc/passwd")
    site = Site(
        served,
        f"https://127.0.0.1:{ui_port}",
        stream_url,
        root / "recordings",
        tls_files.cert,
        live_wav,
        screenshots,
    )
    yield site
    # SIGTERM with a live view open: the view ends, the process drains and exits 0.
    conn, view = _open_live_view(site)

    def read_to_the_end() -> bytes:
        """Read on as a browser does while the server stops, then close (TLS close_notify)."""
        try:
            return view.read()  # to its clean end: no IncompleteRead
        finally:
            conn.close()

    with ThreadPoolExecutor(1) as reader:
        rest = reader.submit(read_to_the_end)
        assert served.stop() == 0, served.log.read_text()
        assert rest.result(timeout=30).endswith(b"\n\n")
    text = served.log.read_text()
    assert TOKEN not in text
    assert "web page: error" not in text
    assert "timeout graceful shutdown exceeded" not in text


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    """Debian's chromium, launched once for the module (Playwright downloads no browser)."""
    assert Path(CHROMIUM).exists(), "the web tests need chromium (bash scripts/test installs it)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _context(browser: Browser) -> BrowserContext:
    return browser.new_context(ignore_https_errors=True, viewport=VIEWPORT)  # type: ignore[arg-type]


def _log_in(page: Page, site: Site, token: str = TOKEN) -> None:
    page.goto(f"{site.base}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_load_state()


@pytest.fixture(scope="module")
def logged_in(browser: Browser, site: Site) -> Iterator[tuple[BrowserContext, list[str]]]:
    """A browser context with a session cookie, and every URL it requested."""
    context = _context(browser)
    urls: list[str] = []
    context.on("request", lambda r: urls.append(r.url))
    page = context.new_page()
    _log_in(page, site)
    assert page.url == f"{site.base}/"
    page.close()
    yield context, urls
    assert not [u for u in urls if TOKEN in u], "a token in a URL"
    context.close()


def _cookie(context: BrowserContext) -> str:
    (cookie,) = [c for c in context.cookies() if c["name"] == "receiver_session"]
    return f"receiver_session={cookie['value']}"


def _raw(
    site: Site,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as given (no normalisation by a client)."""
    port = int(site.base.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=tls.client_context(site.cert), timeout=30
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return response.status, dict(response.getheaders()), b""
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _open_live_view(site: Site) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
    """Log in without a browser and open ``/api/live/events``; the connection and response."""
    status, answer, _ = _raw(
        site,
        "/login",
        method="POST",
        headers={"Origin": site.base, "Content-Type": "application/x-www-form-urlencoded"},
        body=f"token={TOKEN}",
    )
    assert status == 303
    cookie = answer["set-cookie"].split(";")[0]
    port = int(site.base.rsplit(":", 1)[1])
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=tls.client_context(site.cert), timeout=30
    )
    conn.request("GET", "/api/live/events", headers={"Cookie": cookie})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline() == b"retry: 1000\n"
    return conn, response


def test_login_page_refuses_wrong_tokens_slowly_then_sets_a_strict_cookie(
    browser: Browser, site: Site
) -> None:
    """A page without a cookie leads to the login page; a wrong token is answered 401 after a
    delay and logged; the right one sets a signed HttpOnly, Secure, SameSite=Strict cookie."""
    context = _context(browser)
    page = context.new_page()
    page.goto(f"{site.base}/")
    assert page.url == f"{site.base}/login"
    page.screenshot(path=str(site.screenshots / "login.png"))
    for _ in range(2):
        page.fill("#token", "not-the-token-0123456789")
        started = time.monotonic()
        with page.expect_response(f"{site.base}/login") as answer:
            page.click("button[type=submit]")
        assert answer.value.status == 401
        assert time.monotonic() - started >= 0.45  # the first failure waits 0.5 s, then 1 s
        assert page.locator(".error").inner_text() == "That token is not accepted."
    assert not context.cookies()
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.base}/")
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert 11.9 * 3600 < cookie["expires"] - time.time() <= 12 * 3600
    assert "failed login from 127.0.0.1 (2 in 15 min" in site.served.log.read_text()
    context.close()


def test_a_live_stream_shows_with_its_meters_moving(
    logged_in: tuple[BrowserContext, list[str]], site: Site
) -> None:
    """A stream the simulator plays in real time is listed live, its meters updated at least
    5 times a second with changing levels; once it ends it is listed with the recordings."""
    context, _ = logged_in
    page = context.new_page()
    page.goto(f"{site.base}/")
    simulator = subprocess.Popen(
        receiver_cmd(
            "simulate",
            str(site.live_wav),
            str(site.live_wav.with_name("live-out.wav")),
            "--realtime",
            "--url",
            f"{site.stream_url}/conference",
            "--token",
            TOKEN,
            "--cafile",
            str(site.cert),
            "--stream-sid",
            LIVE_SID,
            "--param",
            "room=live",
        ),
        env=env_with(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        row = page.locator(f'#live tr[data-sid="{LIVE_SID}"]')
        row.wait_for(timeout=20_000)
        seen = page.evaluate(
            """(sid) => new Promise((resolve) => {
                const started = performance.now();
                const levels = [];
                let updates = 0;
                document.addEventListener("live-update", (event) => {
                    updates += 1;
                    const stream = event.detail.find((s) => s.stream_sid === sid);
                    if (stream && stream.tracks.inbound) levels.push(stream.tracks.inbound.rms);
                    const elapsed = (performance.now() - started) / 1000;
                    if (elapsed >= 3) resolve({ updates, elapsed, levels });
                });
            })""",
            LIVE_SID,
        )
        rate = seen["updates"] / seen["elapsed"]
        print(f"live view: {rate:.1f} updates/s, {len(set(seen['levels']))} distinct levels")
        assert rate >= 5
        assert len(set(seen["levels"])) >= 5 and max(seen["levels"]) > 0.01
        width = row.locator(".meter[data-track=inbound] .bar").evaluate("b => b.style.width")
        assert width.endswith("%")
        assert row.locator(".params").inner_text() == "room=live"
        page.screenshot(path=str(site.screenshots / "list.png"), full_page=True)
        output, _ = simulator.communicate(timeout=60)
        assert simulator.returncode == 0, output
    finally:
        if simulator.poll() is None:
            simulator.kill()
            simulator.wait()
    page.locator(f'#finished tr[data-directory="{LIVE_SID}"]').wait_for(timeout=20_000)
    assert page.locator(f'#live tr[data-sid="{LIVE_SID}"]').count() == 0
    page.close()


def test_a_stream_page_plays_each_track_and_draws_its_waveform(
    logged_in: tuple[BrowserContext, list[str]], site: Site
) -> None:
    """The stream page: each track's audio element has the track's exact duration, plays and
    seeks (Range requests, 206); each waveform canvas is drawn, with the DTMF digit marked;
    the gap is marked as silence; the record and the parameters are shown."""
    context, _ = logged_in
    page = context.new_page()
    partial: list[str] = []
    page.on("response", lambda r: partial.append(r.url) if r.status == 206 else None)
    page.goto(f"{site.base}/")
    page.locator(f'#finished tr[data-directory="{GAP_SID}"] a').click()
    page.wait_for_url(f"{site.base}/streams/{GAP_SID}")
    page.wait_for_selector("body[data-ready=true]")
    record = site.record(GAP_SID)
    rate = record["media_format"]["sample_rate_hz"]
    lengths = {t: record["tracks"][t]["samples"] / rate for t in ("inbound", "outbound")}
    lengths["stereo"] = max(lengths.values())
    for track, expected in lengths.items():
        audio = page.locator(f"audio[data-track={track}]")
        duration = audio.evaluate(
            """(a) => new Promise((resolve) => a.readyState >= 1 ? resolve(a.duration)
                : a.addEventListener("loadedmetadata", () => resolve(a.duration)))"""
        )
        print(f"{track}: duration {duration:.6f} s, track {expected:.6f} s")
        assert abs(duration - expected) < 1e-3
        played = audio.evaluate(
            """async (a) => {
                await a.play();
                await new Promise((resolve) => {
                    const check = () => { if (a.currentTime > 0.2) resolve(); };
                    a.addEventListener("timeupdate", check);
                });
                a.pause();
                await new Promise((resolve) => {
                    a.addEventListener("seeked", resolve, { once: true });
                    a.currentTime = a.duration - 0.5;
                });
                return a.currentTime;
            }"""
        )
        assert played == pytest.approx(expected - 0.5, abs=0.05)
    assert any(u.endswith(f"/files/{GAP_SID}/inbound.wav") for u in partial), partial
    duration_s = max(lengths.values())
    dtmf_at_s = record["dtmf"][0]["at_ms"] / 1000
    for track, color in (("inbound", (37, 99, 235)), ("outbound", (217, 119, 6))):
        drawn = page.locator(f"canvas[data-track={track}]").evaluate(
            """(c, args) => {
                const [color, dtmfShare] = args;
                const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
                let wave = 0;
                for (let i = 0; i < data.length; i += 4) {
                    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
                    if (r === color[0] && g === color[1] && b === color[2]) wave++;
                }
                const x = Math.round(dtmfShare * c.width);
                const p = c.getContext("2d").getImageData(x, Math.floor(c.height / 2), 1, 1).data;
                return { wave: wave / (c.width * c.height), dtmf: [p[0], p[1], p[2]] };
            }""",
            [list(color), dtmf_at_s / duration_s],
        )
        assert drawn["wave"] > 0.02, drawn
        assert drawn["dtmf"] == [124, 58, 237], drawn  # the DTMF line's violet
    waveform = page.evaluate(f"fetch('/api/streams/{GAP_SID}/waveform').then((r) => r.json())")
    silence = waveform["tracks"]["inbound"]["silence_s"]
    runs = list(zip(silence[::2], silence[1::2], strict=True))
    assert any(1.1 <= start <= 1.25 and end - start >= 0.49 for start, end in runs), runs
    events = page.locator("#events tbody").inner_text()
    assert "dtmf\t5" in events and "mark\tgreeting-done" in events
    facts = page.locator("#params").inner_text()
    assert "room" in facts and "42" in facts and "alice" in facts
    assert json.loads(page.locator("#record").inner_text()) == record
    names = page.locator("#files a").all_inner_texts()
    assert sorted(names) == ["inbound.wav", "outbound.wav", "stereo.wav", "stream.json"]
    page.evaluate("document.querySelectorAll('audio').forEach((a) => { a.currentTime = 0; })")
    page.screenshot(path=str(site.screenshots / "stream.png"), full_page=True)
    page.close()


def test_search_and_pages(logged_in: tuple[BrowserContext, list[str]], site: Site) -> None:
    """The list searches by sid, custom parameter and date, and pages newest first."""
    context, _ = logged_in
    api = context.request

    def finished(query: str) -> dict[str, Any]:
        response = api.get(f"{site.base}/api/streams?{query}")
        assert response.status == 200
        return dict(response.json())

    everything = finished("")
    sids = [s["stream_sid"] for s in everything["finished"]]
    assert sids[-3:] == ["MZ-third-0003", "MZ-other-0002", GAP_SID]  # newest first
    assert [s["stream_sid"] for s in finished("q=room%3D42")["finished"]] == [GAP_SID]
    assert [s["stream_sid"] for s in finished("q=alice")["finished"]] == [GAP_SID]
    assert [s["stream_sid"] for s in finished("q=other-0002")["finished"]] == ["MZ-other-0002"]
    today = everything["finished"][0]["started_at"][:10]
    assert finished(f"date={today}")["total"] == everything["total"]
    assert finished("date=2001-01-01")["total"] == 0
    paged = finished("per_page=1&page=2")
    assert paged["pages"] == everything["total"] and len(paged["finished"]) == 1
    assert paged["finished"][0]["stream_sid"] == sids[1]
    page = context.new_page()
    page.goto(f"{site.base}/")
    page.fill("#q", "room=7")
    page.click("#search button")
    page.wait_for_function("document.querySelectorAll('#finished tbody tr').length === 1")
    assert page.locator("#finished tbody tr").get_attribute("data-directory") == "MZ-other-0002"
    page.close()


def test_an_uploaded_stream_links_to_its_objects(
    logged_in: tuple[BrowserContext, list[str]], site: Site
) -> None:
    """A stream that delivery uploaded says where each of its files went, and the list marks
    it uploaded."""
    context, _ = logged_in
    page = context.new_page()
    page.goto(f"{site.base}/")
    row = page.locator('#finished tr[data-directory="MZ-other-0002"]')
    assert row.locator(".end.uploaded").inner_text() == "uploaded"
    assert page.locator(f'#finished tr[data-directory="{GAP_SID}"] .end.uploaded').count() == 0
    row.locator("a").click()
    page.wait_for_selector("body[data-ready=true]")
    upload = site.record("MZ-other-0002")["upload"]
    shown = {
        item.get_attribute("data-name"): item.locator("code").inner_text()
        for item in page.locator("#stored li").all()
    }
    assert shown == upload["objects"] and "stereo.wav" in shown
    assert upload["url"] in page.locator("#facts").inner_text()
    page.close()


PAGES = ["/", f"/streams/{GAP_SID}", "/streams/no-such-stream"]
API = [
    "/api/streams",
    f"/api/streams/{GAP_SID}",
    f"/api/streams/{GAP_SID}/waveform",
    "/api/live",
    "/api/live/events",
    f"/files/{GAP_SID}/inbound.wav",
    f"/files/{GAP_SID}/stream.json",
]


def test_without_the_cookie_pages_lead_to_login_and_the_api_is_401(
    browser: Browser, site: Site
) -> None:
    """No cookie (or a forged one): every page redirects to /login, every API call is 401."""
    context = _context(browser)
    page = context.new_page()
    for path in PAGES:
        page.goto(f"{site.base}{path}")
        assert page.url == f"{site.base}/login", path
    context.close()
    forged = "receiver_session=abc.99999999999.0123456789abcdef"
    for cookie in (None, forged):
        headers = {"Cookie": cookie} if cookie else {}
        for path in PAGES:
            status, answer, _ = _raw(site, path, headers=headers)
            assert (status, answer.get("location")) == (303, "/login"), path
        for path in API:
            status, _, _ = _raw(site, path, headers=headers)
            assert status == 401, path


TRICKS = [
    f"/files/{GAP_SID}/../stream.json",
    f"/files/{GAP_SID}/..%2Fstream.json",
    f"/files/{GAP_SID}/%2e%2e%2f{GAP_SID}%2fstream.json",
    "/files/..%2F..%2Fetc/passwd",
    "/files/%2E%2E/stream.json",
    "/files/../../etc/passwd",
    "/files//etc/passwd",
    "/files/%2Fetc%2Fpasswd/x.wav",
    f"/files/{GAP_SID}/%2Fetc%2Fpasswd",
    f"/files/{GAP_SID}/leak.wav",  # a symlink to /etc/passwd
    f"/files/{GAP_SID}/inbound.wav%00.json",
    f"/files/{GAP_SID}/stream.json.tmp",
    f"/files/{GAP_SID}",
    "/files/.in-progress/x.json",
    "/api/streams/..",
    "/api/streams/%2E%2E",
    "/api/streams/..%2F..%2Fetc",
    "/api/streams/%2Fetc",
    "/streams/..%2F",
    "/streams/%2Fetc%2Fpasswd",
    "/static/..%2Fapp.py",
    "/static/../app.py",
    "/nothing-here",
]


def test_path_tricks_get_404(logged_in: tuple[BrowserContext, list[str]], site: Site) -> None:
    """With a valid cookie, only files of the recordings directory by stream directory and
    file name are served: `..`, encoded slashes, absolute paths and symlinks get 404."""
    cookie = {"Cookie": _cookie(logged_in[0])}
    status, _, body = _raw(site, f"/files/{GAP_SID}/stream.json", headers=cookie)
    assert status == 200 and json.loads(body)["stream_sid"] == GAP_SID
    for path in TRICKS:
        status, _, body = _raw(site, path, headers=cookie)
        assert status == 404, (path, status)
        assert b"root:" not in body


def test_posts_need_the_page_origin_and_logout_ends_the_session(
    browser: Browser, site: Site
) -> None:
    """POSTs from another origin (or none) are refused 403; logout is a POST that ends the
    session on the server, so that a copy of the cookie no longer works."""
    body = f"token={TOKEN}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for origin in (None, "https://evil.example", site.base.replace("127.0.0.1", "localhost")):
        headers = {**form, **({"Origin": origin} if origin else {})}
        status, answer, _ = _raw(site, "/login", method="POST", headers=headers, body=body)
        assert status == 403 and "set-cookie" not in answer, origin
    status, _, _ = _raw(site, "/logout", method="GET")
    assert status == 405
    context = _context(browser)
    page = context.new_page()
    _log_in(page, site)
    copy = _cookie(context)
    assert _raw(site, "/api/live", headers={"Cookie": copy})[0] == 200
    page.click("header button")
    page.wait_for_url(f"{site.base}/login")
    assert not context.cookies()
    assert _raw(site, "/api/live", headers={"Cookie": copy})[0] == 401
    context.close()
