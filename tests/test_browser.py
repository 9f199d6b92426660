"""A page on another origin, in a real Chromium, against real API and worker processes
(the browser and the stack: tests/browser.py). The page follows sessions with a
bare `EventSource`, as a front-end developer would write it, with no reconnect
logic of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import PageServer, Veteran, received, seq_events, stored_events, wait_until
from conftest import ALPHA_KEY, Stack, nginx_proxy
from helpers import new_session, text_message
from playwright.sync_api import Browser, Page


@pytest.fixture
def client(web: Stack) -> Iterator[httpx.Client]:
    with web.client() as http:
        yield http


@pytest.fixture(scope="module", autouse=True)
def _veteran_starts_now(veteran: Veteran) -> None:
    """The long-lived page (tests/test_page_lifetime.py) starts with these tests."""


def _wait_count(page: Page, event: str, count: int, timeout: float) -> None:
    wait_until(lambda: len(received(page, event)) >= count, timeout, f"{count} {event}")


def _follow(page: Page, url: str) -> None:
    page.evaluate("url => follow(url)", url)
    wait_until(lambda: page.evaluate("opens") >= 1, 10, "the page's stream to open")


def test_page_on_another_origin_follows_a_tool_turn_live_in_seq_order(
    web: Stack, client: httpx.Client, browser: Browser, pages: dict[str, PageServer]
) -> None:
    sid = new_session(client)
    minted = client.post(f"/sessions/{sid}/stream-token").json()
    # Absolute, so the page on another origin uses it as it is.
    assert minted["stream_url"].startswith(f"{web.base_url}/api/v1/sessions/{sid}/stream?token=")
    page = browser.new_page()
    page.goto(pages["allowed"].origin)
    _follow(page, minted["stream_url"])
    reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: echo live; sleep 1"))
    assert reply.status_code == 200, reply.text
    wait_until(lambda: received(page, "session_completed"), 15, "the turn's end on the page")
    events = received(page)
    seqs = [e["data"]["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["id"] for e in events] == [str(s) for s in seqs]
    assert seq_events(page) == stored_events(client, sid, 1)
    started = received(page, "tool_use_start")[0]["at"]
    result = received(page, "tool_result")[0]
    assert result["data"]["content"] == "live\n"
    # Live: the tool call was on the page while the command still ran.
    assert received(page, "session_completed")[0]["at"] - started > 800
    page.close()


FETCHES = """async ({api, sid, credential}) => {
  const auth = {Authorization: `Bearer ${credential}`};
  const out = {};
  try {
    const read = await fetch(`${api}/api/v1/sessions/${sid}`, {headers: auth});
    out.read = {status: read.status, body: await read.json()};
    const sent = await fetch(`${api}/api/v1/sessions/${sid}/messages`, {
      method: "POST",
      headers: {...auth, "Content-Type": "application/json", "Idempotency-Key": "page-1",
                "X-Request-Id": "from-the-page"},
      body: JSON.stringify({role: "user", content: [{type: "text", text: "hi from a page"}]}),
    });
    out.sent = {status: sent.status, body: await sent.json()};
    const gone = await fetch(`${api}/api/v1/sessions/${sid}`, {method: "DELETE", headers: auth});
    out.delete = {status: gone.status, body: await gone.json()};
    const listed = await fetch(`${api}/api/v1/sandboxes`, {headers: auth});
    out.list = {status: listed.status, retry: listed.headers.get("retry-after")};
  } catch (error) {
    out.error = String(error);
  }
  return out;
}"""


def test_page_on_another_origin_calls_the_api_with_a_browser_credential(
    web: Stack, client: httpx.Client, browser: Browser, pages: dict[str, PageServer]
) -> None:
    sid = new_session(client)
    # The tenant's backend mints the credential; the page never sees the key.
    grant = client.post(f"/sessions/{sid}/grants").json()
    assert grant["scopes"] == ["read", "stream", "send", "interrupt"]
    page = browser.new_page()
    page.goto(pages["allowed"].origin)
    args = {"api": web.base_url, "sid": sid, "credential": grant["token"]}
    out = page.evaluate(FETCHES, args)
    assert "error" not in out, out
    assert out["read"]["status"] == 200 and out["read"]["body"]["id"] == sid
    # The POST needed a preflight (Authorization, Content-Type, Idempotency-Key).
    assert out["sent"]["status"] == 200
    assert out["sent"]["body"]["role"] == "assistant"
    # Nothing beyond the session: the page can read the refusal, it is CORS'd too.
    assert out["delete"]["status"] == 403 and out["delete"]["body"]["code"] == "outside_grant"
    assert out["list"]["status"] == 403
    assert client.get(f"/sessions/{sid}").status_code == 200

    stranger = browser.new_page()
    stranger.goto(pages["other"].origin)
    refused = stranger.evaluate(FETCHES, args)
    assert refused.get("error", "").startswith("TypeError"), refused
    page.close()
    stranger.close()


def test_rolling_restart_behind_nginx_loses_and_repeats_nothing(
    web: Stack,
    client: httpx.Client,
    browser: Browser,
    pages: dict[str, PageServer],
    tmp_path: Path,
) -> None:
    second = web.start_api()
    ports = [web.port, int(second.rsplit(":", 1)[1])]
    with nginx_proxy(ports, tmp_path) as (base, log):
        auth = {"Authorization": f"Bearer {ALPHA_KEY}"}
        with httpx.Client(base_url=base + "/api/v1", headers=auth, timeout=30) as proxied:
            sid = new_session(proxied)
            minted = proxied.post(f"/sessions/{sid}/stream-token").json()
            # Built from the Host the proxy passes on, port included.
            assert minted["stream_url"].startswith(f"{base}/api/v1/")
            page = browser.new_page()
            page.goto(pages["allowed"].origin)
            _follow(page, minted["stream_url"])
            # Each replica in turn is stopped (SIGTERM) and started again while a
            # turn is running, as a rolling deploy does.
            for done, port in enumerate(ports, start=1):
                sent = proxied.post(
                    f"/sessions/{sid}/messages",
                    params={"wait": "0"},
                    json=text_message("run: echo step; sleep 1"),
                )
                assert sent.status_code == 202, sent.text
                _wait_count(page, "tool_use_start", done, 15)
                web.restart_api(port)
                _wait_count(page, "session_completed", done, 20)
            last = proxied.post(f"/sessions/{sid}/messages", json=text_message("after the deploy"))
            assert last.status_code == 200, last.text
        _wait_count(page, "session_completed", 3, 15)
        assert page.evaluate("source.readyState") != 2  # never gave up
        assert len(received(page, "reconnect")) >= 1  # its replica told it to go elsewhere
        assert page.evaluate("opens") >= 2
        got = seq_events(page)
        assert [seq for seq, _ in got] == list(range(1, len(got) + 1))
        assert got == stored_events(client, sid, 3)
        page.close()
    assert minted["token"] not in log.read_text()
