"""A real Chromium for the browser tests, and a page server on another origin.

Playwright (from PyPI) drives Debian's `chromium` (scripts/ensure-tools.sh
installs it); it never downloads a browser of its own. The flags keep Chromium
off the network it would otherwise call home to.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from playwright.sync_api import Browser, Page, sync_playwright

SCREENSHOTS = ROOT / "build" / "screenshots"
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
