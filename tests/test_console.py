"""The console at /console and the docs at /docs, in a real Chromium, against real
API and worker processes (tests/browser.py). Screenshots go to build/screenshots/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from browser import screenshot, wait_until
from conftest import ADMIN_KEY, ALPHA_KEY, Stack
from helpers import new_session, text_message
from playwright.sync_api import Browser


@pytest.fixture
def client(web: Stack) -> Iterator[httpx.Client]:
    with web.client() as http:
        yield http


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


def _stored(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
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
    assert shown == _stored(client, sid)
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
    assert console.transcript() == _stored(client, sid)
    assert "turn ended: interrupted" in str(console.page.text_content("#transcript"))
    assert _no_gap(console.seqs())
    screenshot(console.page, "console-interrupted")


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
        assert console.transcript() == _stored(after, sid)
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
    assert console.transcript() == _stored(client, sid)
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
