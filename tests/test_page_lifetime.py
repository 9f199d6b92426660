"""An open page outlives its stream token's opening window: the page that the
first browser test opened (tests/browser.py `veteran`) is still following its
session, through every API restart since, when this runs (the suite orders it
late, so that its minute has mostly passed already)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from browser import Veteran, received, seq_events, stored_events, wait_until
from conftest import Stack
from helpers import text_message


@pytest.fixture
def client(web: Stack) -> Iterator[httpx.Client]:
    with web.client() as http:
        yield http


def test_page_survives_an_api_restart_after_the_tokens_first_minute(
    web: Stack, client: httpx.Client, veteran: Veteran
) -> None:
    page, sid = veteran.page, veteran.sid
    # Time itself is what this test is about: the token must be past its
    # opening window and its first minute, as an old page's is after a deploy.
    time.sleep(max(0.0, veteran.minted_at + 61 - time.time()))
    opened = page.evaluate("opens")
    web.restart_api()
    wait_until(lambda: page.evaluate("opens") > opened, 20, "the page to reconnect")
    assert time.time() - veteran.minted_at > 60
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
