"""Chromium against real API and worker processes (the stack: tests/browser.py).

First a page on another origin, which follows sessions with a bare
`EventSource`, as a front-end developer would write it, with no reconnect logic
of its own; then the console at /console and the docs at /docs, whose
screenshots go to build/screenshots/. One browser for the module; the page of
the last test has been open since the module began.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import (
    OPENS_FOR,
    Console,
    PageServer,
    chromium,
    received,
    screenshot,
    seq_events,
    stored_events,
    stored_transcript,
)
from conftest import ADMIN_KEY, ALPHA_KEY, Stack, nginx_proxy
from helpers import StreamReader, new_session, text_message, wait_until
from playwright.sync_api import Browser, Page


@pytest.fixture
def client(web: Stack) -> Iterator[httpx.Client]:
    with web.client() as http:
        yield http


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


class Veteran:
    """A page that starts following a session with this module, so that by the
    module's last test its stream token is past its opening window (and through
    the API restarts of the tests in between)."""

    def __init__(self, page: Page, sid: str, minted_at: float) -> None:
        self.page, self.sid, self.minted_at = page, sid, minted_at


@pytest.fixture(scope="module", autouse=True)
def veteran(web: Stack, browser: Browser, pages: dict[str, PageServer]) -> Iterator[Veteran]:
    with web.client() as client:
        sid = new_session(client)
        minted_at = time.time()
        stream_url = client.post(f"/sessions/{sid}/stream-token").json()["stream_url"]
    page = browser.new_page()
    page.goto(pages["allowed"].origin)
    _follow(page, stream_url)
    yield Veteran(page, sid, minted_at)
    page.close()


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


# ---- the console at /console and the docs at /docs (screenshots: build/screenshots/)


@pytest.fixture
def console(browser: Browser, web: Stack) -> Iterator[Console]:
    tab = Console(browser, web)
    yield tab
    tab.page.close()


def _no_gap(seqs: list[int]) -> bool:
    return seqs == list(range(1, len(seqs) + 1))


def test_console_signs_in_with_a_key_and_lists_sandboxes_and_sessions(
    console: Console, client: httpx.Client
) -> None:
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
    console.sign_in(ALPHA_KEY)
    assert console.page.text_content("#who") == "alpha"
    console.page.click(f"#sandboxes li[data-id='{sandbox}'] a")
    console.page.click(f"#sessions li[data-id='{sid}'] a")
    console.wait_connection("live")
    assert console.page.text_content("#session-id") == sid
    assert console.state() == "active"
    assert console.page.is_hidden("#nav-ops")  # not an admin key


def test_console_shows_a_live_turn_sends_and_matches_the_stored_history(
    console: Console, client: httpx.Client
) -> None:
    sid = new_session(client)
    assert client.post(f"/sessions/{sid}/messages", json=text_message("hello")).status_code == 200
    console.sign_in(ALPHA_KEY)
    console.open_session(sid)
    console.page.fill("#message", "run: echo from the console; sleep 2")
    console.page.click("#send")
    # The tool call shows, as a collapsible block, while the turn still runs.
    console.page.wait_for_selector(".msg.live details.block.tool_use", timeout=15_000)
    assert console.state() == "running"
    screenshot(console.page, "console-live-turn")
    wait_until(lambda: console.state() == "active", 20, "the turn's end")
    wait_until(lambda: len(console.transcript()) == 4, 10, "four messages")
    shown = console.transcript()
    assert shown == stored_transcript(client, sid)
    assert shown[3]["blocks"][1]["content"] == "from the console\n"
    assert _no_gap(console.seqs())
    screenshot(console.page, "console-session")
    assert console.only_same_origin(), console.requests


def test_console_interrupts_a_running_command(console: Console, client: httpx.Client) -> None:
    sid = new_session(client)
    console.sign_in(ALPHA_KEY)
    console.open_session(sid)
    console.page.fill("#message", "run: sleep 60")
    console.page.click("#send")
    console.page.wait_for_selector(".msg.live details.block.tool_use", timeout=15_000)
    console.page.click("#interrupt")
    wait_until(lambda: console.state() == "active", 20, "the interrupted turn's end")
    wait_until(lambda: not console.page.query_selector(".msg.live"), 10, "the live turn to settle")
    stored = client.get(f"/sessions/{sid}").json()["messages"]
    assert stored[-1]["stop_reason"] == "interrupted"
    assert console.transcript() == stored_transcript(client, sid)
    assert "turn ended: interrupted" in str(console.page.text_content("#transcript"))
    assert _no_gap(console.seqs())
    screenshot(console.page, "console-interrupted")


def test_console_decides_a_tool_call_that_awaits_approval(
    console: Console, client: httpx.Client
) -> None:
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    agent = {"permissions": {"bash": "ask"}}
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={"agent": agent}).json()["id"]
    console.sign_in(ALPHA_KEY)
    console.open_session(sid)
    console.page.fill("#message", "run: echo approved in the console")
    console.page.click("#send")
    allow = console.page.wait_for_selector(
        ".msg.live .block.approval button[data-decision=allow]", timeout=15_000
    )
    assert console.state() == "awaiting_approval"
    assert client.get(f"/sessions/{sid}").json()["state"] == "awaiting_approval"
    screenshot(console.page, "console-awaiting-approval")
    assert allow is not None
    allow.click()
    wait_until(lambda: console.state() == "active", 20, "the approved turn's end")
    wait_until(lambda: len(console.transcript()) == 2, 10, "two messages")
    stored = client.get(f"/sessions/{sid}").json()["messages"]
    assert stored[-1]["content"][1]["content"] == "approved in the console\n"
    assert console.transcript() == stored_transcript(client, sid)
    assert _no_gap(console.seqs())


def test_console_reconnects_by_itself_after_an_api_restart(
    console: Console, client: httpx.Client, web: Stack
) -> None:
    sid = new_session(client)
    console.sign_in(ALPHA_KEY)
    console.open_session(sid)
    web.restart_api()
    console.wait_connection("live")
    with web.client() as after:
        sent = after.post(f"/sessions/{sid}/messages", json=text_message("run: echo back"))
        assert sent.status_code == 200
        wait_until(lambda: len(console.transcript()) == 2, 15, "the turn after the restart")
        wait_until(lambda: console.state() == "active", 10, "the turn's end")
        assert console.transcript() == stored_transcript(after, sid)
    assert _no_gap(console.seqs())


def test_console_with_a_browser_credential_sees_only_its_session(
    console: Console, client: httpx.Client
) -> None:
    sid = new_session(client)
    grant = client.post(f"/sessions/{sid}/grants", json={"expires_in": 600}).json()
    # A tenant's backend opens the console for one session: the credential
    # rides in the fragment, which the browser never sends to a server.
    console.page.goto(f"{console.web.base_url}/console/#credential={grant['token']}")
    console.wait_connection("live")
    assert console.page.text_content("#session-id") == sid
    assert console.page.is_hidden("#nav-sandboxes")
    assert "#credential" not in console.page.url
    console.page.fill("#message", "hi")
    console.page.click("#send")
    wait_until(lambda: len(console.transcript()) == 2, 15, "the reply")
    wait_until(lambda: console.state() == "active", 10, "the turn's end")
    assert console.transcript() == stored_transcript(client, sid)
    assert not any(grant["token"] in url for url in console.requests)


def test_console_ops_panel_charts_queues_and_workers(
    console: Console, client: httpx.Client
) -> None:
    console.sign_in(ADMIN_KEY)
    assert console.page.is_visible("#nav-ops")
    console.page.click("#nav-ops")
    console.page.wait_for_selector("#workers tbody tr")
    sid = new_session(client)
    assert client.post(f"/sessions/{sid}/messages", json=text_message("hi")).status_code == 200
    console.page.wait_for_selector("#chart[data-samples='3']", timeout=15_000)
    assert console.page.locator("#chart polyline").count() == 3
    assert console.page.text_content("#queues tbody td") == "ss:queue"
    screenshot(console.page, "console-ops")


def test_docs_render_the_openapi_document_from_local_assets(console: Console) -> None:
    console.page.goto(f"{console.web.base_url}/docs")
    console.page.wait_for_selector(
        "text=Mint a browser credential for one session (tenant keys only)"
    )
    assert console.page.locator(".opblock").count() >= 15
    screenshot(console.page, "docs")
    assert console.only_same_origin(), console.requests


# Last in the module: by now its page's token is past its opening window.
def test_page_survives_an_api_restart_after_the_tokens_opening_window(
    web: Stack, client: httpx.Client, veteran: Veteran
) -> None:
    page, sid = veteran.page, veteran.sid
    # Time itself is what this test is about: the token must be past its
    # opening window, as an old page's is after a deploy.
    time.sleep(max(0.0, veteran.minted_at + OPENS_FOR + 1 - time.time()))
    opened = page.evaluate("opens")
    web.restart_api()
    wait_until(lambda: page.evaluate("opens") > opened, 20, "the page to reconnect")
    assert time.time() - veteran.minted_at > OPENS_FOR
    reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: echo still here"))
    assert reply.status_code == 200, reply.text
    wait_until(lambda: received(page, "session_completed"), 15, "the turn on the old page")
    assert page.evaluate("source.readyState") == 1
    assert received(page, "tool_result")[0]["data"]["content"] == "still here\n"
    got = seq_events(page)
    assert got == stored_events(client, sid, 1)
    # The page resumed with the same token; its URL alone no longer opens the stream.
    url = page.evaluate("source.url")
    assert httpx.get(url, timeout=10).status_code == 401


def test_console_recovers_from_a_failed_refresh_at_the_next_keepalive(
    console: Console, client: httpx.Client
) -> None:
    sid = new_session(client)
    console.sign_in(ALPHA_KEY)
    console.open_session(sid)
    console.wait_connection("live")
    reader = StreamReader(client, sid, params={"after": "0"}, until=1)
    sent = client.post(
        f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("run: sleep 2")
    )
    assert sent.status_code == 202
    wait_until(lambda: console.state() == "running", 10, "the turn on the page")
    # From now on the page's reads of the session fail: its refresh at the turn's
    # end is lost, and what it shows comes from the stream alone.
    failing = f"**/api/v1/sessions/{sid}"
    console.page.route(failing, lambda route: route.abort())
    last = reader.join()[-1]["seq"]
    wait_until(lambda: console.seqs()[-1:] == [last], 10, "the turn's end on the page")
    time.sleep(0.5)
    assert console.state() == "running"  # stale: its refresh failed
    console.page.unroute(failing)
    # The next keepalive (every 2 s here) shows the page behind, and it reads again.
    wait_until(lambda: console.state() == "active", 10, "the turn's end after a keepalive")
    assert console.transcript() == stored_transcript(client, sid)
