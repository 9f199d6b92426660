"""A real Chromium for the browser tests, a page server on another origin, and
the stack they run against (a pytest plugin, loaded by conftest).

Playwright (from PyPI) drives Debian's `chromium` (scripts/ensure-tools.sh
installs it); it never downloads a browser of its own. The flags keep Chromium
off the network it would otherwise call home to. A module of browser tests
gets one stack, stopped with the module: CORS allows the page server's origin,
and stream tokens open their stream by URL for 20 s and resume it for 3 minutes
(short, so that a page past its token's first minute is seen within the run).
The module opens one browser and closes it at its end: Playwright's sync API
runs an event loop on the main thread while a browser is open, which later
tests that use `asyncio.run` must not find.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import ROOT, Stack
from helpers import StreamReader
from playwright.sync_api import Browser, Page, sync_playwright

SCREENSHOTS = ROOT / "build" / "screenshots"
OPENS_FOR = 10
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


@pytest.fixture(scope="module")
def pages() -> Iterator[dict[str, PageServer]]:
    """Two other origins: one the API allows, one it does not."""
    allowed, other = PageServer(FOLLOWER_PAGE), PageServer(FOLLOWER_PAGE)
    yield {"allowed": allowed, "other": other}
    allowed.close()
    other.close()


@pytest.fixture(scope="module")
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


class Console:
    """A console tab; remembers every URL the page asked for."""

    def __init__(self, browser: Browser, web: Stack) -> None:
        self.web = web
        self.page = browser.new_page(viewport={"width": 1200, "height": 800})
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))

    def sign_in(self, key: str, fragment: str = "") -> None:
        self.page.goto(f"{self.web.base_url}/console/{fragment}")
        self.page.fill("#key", key)
        self.page.click("#signin button[type=submit]")
        self.page.wait_for_selector("#who:not(:empty)")

    def open_session(self, sid: str) -> None:
        self.page.evaluate("sid => { location.hash = `#/sessions/${sid}`; }", sid)
        self.wait_connection("live")

    def wait_connection(self, state: str) -> None:
        self.page.wait_for_selector(f"body[data-connection={state}]", timeout=20_000)

    def state(self) -> str:
        return str(self.page.text_content("#state"))

    def transcript(self) -> list[dict[str, Any]]:
        shown: list[dict[str, Any]] = self.page.evaluate(TRANSCRIPT)
        return shown

    def seqs(self) -> list[int]:
        seqs: list[int] = self.page.evaluate("window.sandstreamConsole.view.seqs")
        return seqs

    def only_same_origin(self) -> bool:
        return all(url.startswith(self.web.base_url + "/") for url in self.requests)


# What the console shows, in the shape of the stored messages.
TRANSCRIPT = """() => [...document.querySelectorAll("#transcript .msg")].map((m) => ({
  role: m.dataset.role,
  live: m.classList.contains("live"),
  blocks: [...m.querySelectorAll(":scope > .block")].map((b) => {
    const type = b.dataset.type;
    const pre = b.querySelector("pre");
    if (type === "text") return {type, text: b.textContent};
    if (type === "tool_use") return {type, id: b.dataset.id, name: b.dataset.name,
                                     input: JSON.parse(pre.textContent || "null")};
    if (type === "tool_result") return {type, tool_use_id: b.dataset.toolUseId,
                                        content: pre.textContent,
                                        is_error: b.dataset.isError === "true"};
    return {type};
  }),
}))"""


def stored_transcript(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    def block(b: dict[str, Any]) -> dict[str, Any]:
        if b["type"] == "text":
            return {"type": "text", "text": b["text"]}
        if b["type"] == "tool_use":
            return {"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]}
        return {
            "type": "tool_result",
            "tool_use_id": b["tool_use_id"],
            "content": b["content"],
            "is_error": b["is_error"],
        }

    messages = client.get(f"/sessions/{sid}").json()["messages"]
    return [
        {"role": m["role"], "live": False, "blocks": [block(b) for b in m["content"]]}
        for m in messages
    ]
