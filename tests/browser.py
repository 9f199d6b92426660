"""A real Chromium for the browser tests, a page server on another origin, and
the stack they run against (a pytest plugin, loaded by conftest).

Playwright (from PyPI) drives Debian's `chromium` (scripts/ensure-tools.sh
installs it); it never downloads a browser of its own. The flags keep Chromium
off the network it would otherwise call home to. One browser and one stack
serve every browser test of a run: CORS allows the page server's origin, and
stream tokens open their stream by URL for 20 s and resume it for 3 minutes
(short, so that a page past its token's first minute is seen within the run).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import ROOT, Stack
from helpers import StreamReader, new_session
from playwright.sync_api import Browser, Page, sync_playwright

SCREENSHOTS = ROOT / "build" / "screenshots"
OPENS_FOR = 20
GRANT_LIFETIME = 180
CHROMIUM_FLAGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.fail("chromium is missing: scripts/ensure-tools.sh installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


class PageServer:
    """Serves one HTML page at `/` from its own origin (another port of 127.0.0.1)."""

    def __init__(self, html: str) -> None:
        body = html.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll something observable (a page's state, the API) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# A page of some other site that follows a session with EventSource, as a
# front-end developer would write it: no reconnect logic of its own.
FOLLOWER_PAGE = """<!doctype html><html><body><pre id="log"></pre><script>
const names = ["text_delta", "text_complete", "tool_use_start", "tool_use_complete",
  "tool_result", "session_completed", "session_failed", "keepalive", "reconnect",
  "log_truncated", "grant_expired"];
window.received = []; window.errors = 0; window.opens = 0;
window.follow = (url) => {
  const source = new EventSource(url);
  window.source = source;
  for (const name of names) {
    source.addEventListener(name, (e) => {
      if (name === "keepalive") return;
      window.received.push({event: name, id: e.lastEventId, at: performance.now(),
                            data: JSON.parse(e.data)});
    });
  }
  source.onopen = () => { window.opens += 1; };
  source.onerror = () => { window.errors += 1; };
};
</script></body></html>"""


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="session")
def pages() -> Iterator[dict[str, PageServer]]:
    """Two other origins: one the API allows, one it does not."""
    allowed, other = PageServer(FOLLOWER_PAGE), PageServer(FOLLOWER_PAGE)
    yield {"allowed": allowed, "other": other}
    allowed.close()
    other.close()


@pytest.fixture(scope="session")
def web(redis_url: str, pages: dict[str, PageServer]) -> Iterator[Stack]:
    url = redis_url.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(url).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="sandstream-browser-"))
    env = {
        "SANDSTREAM_CORS_ORIGINS": pages["allowed"].origin,
        "SANDSTREAM_STREAM_TOKEN_SECONDS": str(OPENS_FOR),
        "SANDSTREAM_STREAM_GRANT_SECONDS": str(GRANT_LIFETIME),
        "SANDSTREAM_KEEPALIVE_SECONDS": "2",
    }
    running = Stack(url, workdir, env)
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


class Veteran:
    """A page that started following a session with the first browser test, so
    that by the time its own test runs its stream token is past its first minute
    (and through every API restart the tests in between make)."""

    def __init__(self, page: Page, sid: str, minted_at: float) -> None:
        self.page, self.sid, self.minted_at = page, sid, minted_at


@pytest.fixture(scope="session")
def veteran(web: Stack, browser: Browser, pages: dict[str, PageServer]) -> Iterator[Veteran]:
    with web.client() as client:
        sid = new_session(client)
        minted_at = time.time()
        stream_url = client.post(f"/sessions/{sid}/stream-token").json()["stream_url"]
    page = browser.new_page()
    page.goto(pages["allowed"].origin)
    page.evaluate("url => follow(url)", stream_url)
    wait_until(lambda: page.evaluate("opens") >= 1, 10, "the veteran page's stream")
    yield Veteran(page, sid, minted_at)
    page.close()


def received(page: Page, event: str | None = None) -> list[dict[str, Any]]:
    """What a FOLLOWER_PAGE got, optionally of one event type."""
    events: list[dict[str, Any]] = page.evaluate("received")
    return [e for e in events if event is None or e["event"] == event]


def seq_events(page: Page) -> list[tuple[int, str]]:
    return [(e["data"]["seq"], e["event"]) for e in received(page) if "seq" in e["data"]]


def stored_events(client: httpx.Client, sid: str, turns: int) -> list[tuple[int, str]]:
    """The session's log, as (seq, event) pairs, replayed from the start."""
    replay = StreamReader(client, sid, until=turns, params={"after": "0"}).join()
    return [(e["seq"], e["_event"]) for e in replay]
