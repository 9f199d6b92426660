"""Browser credentials and stream tokens: scope, lifetime, renewal, stream budgets."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import BETA_KEY, RedisServer, Stack
from helpers import StreamReader, new_session, text_message

from api import grants
from shared import keys


def _grant(**changes: Any) -> grants.Grant:
    now = time.time()
    fields: dict[str, Any] = {
        "id": "g1",
        "kind": "browser",
        "tenant": "alpha",
        "session_id": "s1",
        "scopes": ("read", "stream"),
        "key_id": "k1",
        "opens_until": now + 60,
        "expires_at": now + 3600,
    }
    return grants.Grant(**(fields | changes))


def test_a_grant_permits_its_own_session_and_scopes_only() -> None:
    grant = _grant()
    assert grant.permits("s1", "read") and grant.permits("s1", "stream")
    assert not grant.permits("s1", "send")
    assert not grant.permits("s2", "read")
    assert not grant.permits("s1", None)  # routes that name no scope refuse grants


def test_a_stream_token_opens_by_url_in_its_first_window_and_resumes_after() -> None:
    fresh = _grant(kind="stream", scopes=("stream",))
    assert fresh.opens(resuming=False) and fresh.opens(resuming=True)
    older = _grant(kind="stream", scopes=("stream",), opens_until=time.time() - 1)
    assert not older.opens(resuming=False)
    assert older.opens(resuming=True)


def test_tokens_are_kept_by_digest_for_the_grant_lifetime(redis_url: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            token, grant = await grants.mint(
                client,
                kind="stream",
                tenant="alpha",
                session_id="s1",
                scopes=("stream",),
                key_id="k1",
                lifetime=600,
                opening=60,
            )
            assert token.startswith("sst_")
            assert 59 < grant.opens_until - time.time() <= 60
            stored = [k.decode() async for k in client.scan_iter(keys.grant("*"))]
            assert stored and all(token not in k for k in stored)
            ttl = await client.pttl(keys.grant(grants._digest(token)))
            assert 590_000 < ttl <= 600_000
            assert await grants.redeem(client, token, "stream") == grant
            # A stream token is not a browser credential, and a guess is nothing.
            assert await grants.redeem(client, token, "browser") is None
            assert await grants.redeem(client, "sst_" + "x" * 43, "stream") is None
            _, child = await grants.mint(
                client,
                kind="stream",
                tenant="alpha",
                session_id="s1",
                scopes=("stream",),
                key_id="k1",
                lifetime=600,
                opening=60,
                not_after=time.time() + 5,
            )
            # Minted under a parent grant, it never outlives the parent.
            assert child.expires_at <= time.time() + 5 and child.opens_until <= child.expires_at
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_stream_admission_past_the_budget_says_when_to_come_back(redis_url: str) -> None:
    async def scenario() -> list[int | None]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return [await grants.admit_stream(client, "grant:budget", 3) for _ in range(5)]
        finally:
            await client.aclose()

    answers = asyncio.run(scenario())
    if None in answers[3:]:  # the minute turned over during the test: its window reset
        answers = asyncio.run(scenario())
    assert answers[:3] == [None, None, None]
    assert all(isinstance(ms, int) and 0 < ms <= 65_000 for ms in answers[3:])


def test_a_budget_window_is_counted_in_one_call_and_expires(own_redis: RedisServer) -> None:
    """Each use is one script call (INCR; EXPIRE on the window's first), not a
    MULTI/INCR/EXPIRE/EXEC transaction; the window's counter expires."""

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(own_redis.url)
        key = f"ss:test:budget:{uuid.uuid4().hex}"
        try:
            await grants.count_in_window(client, key + ":warm")  # loads the script
            before = await client.info("commandstats")
            counts = [await grants.count_in_window(client, key) for _ in range(5)]
            after = await client.info("commandstats")
            assert counts == [1, 2, 3, 4, 5]
            assert 0 < await client.ttl(key) <= 120
            calls = {
                name: stat["calls"] - before.get(name, {"calls": 0})["calls"]
                for name, stat in after.items()
                if name != "cmdstat_info"
            }
            assert {n: c for n, c in calls.items() if c} == {
                "cmdstat_evalsha": 5,
                "cmdstat_incr": 5,
                "cmdstat_expire": 1,
            }, calls
        finally:
            await client.aclose()

    asyncio.run(scenario())


# ---- over HTTP, against real processes ---------------------------------------


def test_a_browser_credential_reaches_its_session_and_nothing_else(
    stack: Stack, client: httpx.Client
) -> None:
    sid = new_session(client)
    other = new_session(client)
    grant = client.post(f"/sessions/{sid}/grants").json()
    assert grant["session_url"] == f"{stack.base_url}/api/v1/sessions/{sid}"
    page = {"Authorization": f"Bearer {grant['token']}"}
    with httpx.Client(base_url=stack.base_url + "/api/v1", headers=page, timeout=30) as browser:
        assert browser.get("/whoami").json()["session_id"] == sid
        assert browser.get(f"/sessions/{sid}").status_code == 200
        sent = browser.post(f"/sessions/{sid}/messages", json=text_message("hi"))
        assert sent.status_code == 200, sent.text
        assert browser.post(f"/sessions/{sid}/interrupt").status_code == 200
        assert browser.post(f"/sessions/{sid}/stream-token").status_code == 201
        reader = StreamReader(browser, sid, params={"after": "0"})
        assert reader.join()[-1]["_event"] == "session_completed"
        sandbox = client.get(f"/sessions/{sid}").json()["sandbox_id"]
        refused = [
            browser.delete(f"/sessions/{sid}"),
            browser.get(f"/sessions/{other}"),
            browser.post(f"/sessions/{other}/messages", json=text_message("run: touch x")),
            browser.get("/sandboxes"),
            browser.post("/sandboxes", json={}),
            browser.get(f"/sandboxes/{sandbox}/sessions"),
            browser.delete(f"/sandboxes/{sandbox}"),
            browser.post(f"/sessions/{sid}/grants"),
            browser.get("/ops/queues"),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        assert {r.json()["code"] for r in refused} <= {"outside_grant", "forbidden"}
        # As a URL token it is nothing: browser credentials go in a header only.
        assert (
            httpx.get(
                f"{stack.base_url}/api/v1/sessions/{sid}/stream", params={"token": grant["token"]}
            ).status_code
            == 401
        )
    assert client.get(f"/sessions/{sid}").status_code == 200
    assert client.get(f"/sessions/{other}").json()["messages"] == []


def test_a_browser_credential_has_the_scopes_its_backend_chose(
    stack: Stack, client: httpx.Client
) -> None:
    sid = new_session(client)
    grant = client.post(f"/sessions/{sid}/grants", json={"scopes": ["read"]}).json()
    assert grant["scopes"] == ["read"]
    page = {"Authorization": f"Bearer {grant['token']}"}
    with httpx.Client(base_url=stack.base_url + "/api/v1", headers=page, timeout=10) as browser:
        assert browser.get(f"/sessions/{sid}").status_code == 200
        assert browser.post(f"/sessions/{sid}/messages", json=text_message("x")).status_code == 403
        assert browser.post(f"/sessions/{sid}/interrupt").status_code == 403
        assert browser.post(f"/sessions/{sid}/stream-token").status_code == 403
        assert browser.get(f"/sessions/{sid}/stream").status_code == 403


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"scopes": []}, 422),
        ({"scopes": ["delete"]}, 422),
        ({"expires_in": 0}, 422),
        ({"expires_in": 10**9}, 422),
        ({"expires_in": "soon"}, 422),
        ({"ttl": 5}, 422),
        ("{not json", 400),
    ],
)
def test_a_bad_grant_request_is_a_clear_4xx(
    client: httpx.Client, session_id: str, body: Any, status: int
) -> None:
    if isinstance(body, str):
        response = client.post(f"/sessions/{session_id}/grants", content=body)
    else:
        response = client.post(f"/sessions/{session_id}/grants", json=body)
    assert response.status_code == status, response.text
    assert response.json()["code"] in {"invalid_body", "malformed_json"}


def test_another_tenant_cannot_mint_for_a_session(stack: Stack, session_id: str) -> None:
    with stack.client(BETA_KEY) as beta:
        assert beta.post(f"/sessions/{session_id}/grants").status_code == 404


def test_a_browser_credential_expires_and_so_do_its_stream_tokens(
    stack: Stack, client: httpx.Client
) -> None:
    sid = new_session(client)
    grant = client.post(f"/sessions/{sid}/grants", json={"expires_in": 2}).json()
    page = {"Authorization": f"Bearer {grant['token']}"}
    with httpx.Client(base_url=stack.base_url + "/api/v1", headers=page, timeout=10) as browser:
        minted = browser.post(f"/sessions/{sid}/stream-token").json()
        assert minted["expires_in"] <= 2 and minted["opens_for"] <= 2
        # A stream it opens ends when it expires, saying so (keepalives are 1 s here).
        reader = StreamReader(browser, sid)
        reader._thread.join(10)
        assert not reader._thread.is_alive(), "the stream outlived its grant"
        assert reader.error is None
        assert [e["_event"] for e in reader.events] == ["grant_expired"]
        assert browser.get(f"/sessions/{sid}").status_code == 401
        headers = {"Last-Event-ID": "0"}
        token = {"token": minted["token"]}
        assert (
            browser.get(f"/sessions/{sid}/stream", params=token, headers=headers).status_code == 401
        )


def test_renewing_a_stream_token_loses_and_repeats_nothing(
    stack: Stack, client: httpx.Client
) -> None:
    sid = new_session(client)
    first = client.post(f"/sessions/{sid}/stream-token").json()
    with httpx.Client(base_url=stack.base_url + "/api/v1", timeout=30) as browser:
        old = StreamReader(browser, sid, until=1, params={"token": first["token"]})
        client.post(f"/sessions/{sid}/messages", json=text_message("run: echo one"))
        before = old.join()
        # Renewal: a new token, the stream opened again after the last seq seen.
        renewed = client.post(f"/sessions/{sid}/stream-token").json()
        assert renewed["token"] != first["token"]
        new = StreamReader(
            browser,
            sid,
            until=1,
            params={"token": renewed["token"], "after": str(before[-1]["seq"])},
        )
        client.post(f"/sessions/{sid}/messages", json=text_message("two"))
        after = new.join()
    seqs = [e["seq"] for e in before + after]
    assert seqs == list(range(1, len(seqs) + 1))
    replay = StreamReader(client, sid, until=2, params={"after": "0"}).join()
    assert before + after == replay


def _open_stream(base: str, sid: str, token: str) -> tuple[int, str, bytes]:
    """Open a stream as EventSource would, read its first write, leave."""
    with httpx.stream(
        "GET",
        f"{base}/api/v1/sessions/{sid}/stream",
        params={"token": token},
        headers={"Accept": "text/event-stream"},
        timeout=10,
    ) as response:
        return response.status_code, response.headers["content-type"], next(response.iter_bytes())


def test_stream_connections_have_their_own_budget_and_never_get_429(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(rate_limit_per_minute="8", stream_connects_per_minute="3")
    for _ in range(3):  # a try that straddles a minute boundary sees two windows
        minute = int(time.time() // 60)
        with stack.client(BETA_KEY) as client:
            sid = new_session(client)  # 2 requests
            token = client.post(f"/sessions/{sid}/stream-token").json()["token"]  # 3
            spare = client.post(f"/sessions/{sid}/stream-token").json()["token"]  # 4
            opened = [_open_stream(stack.base_url, sid, token) for _ in range(6)]
            # The streams used none of the REST budget: 4 more requests pass.
            rest = [client.get(f"/sessions/{sid}").status_code for _ in range(5)]
            other = _open_stream(stack.base_url, sid, spare)
        if int(time.time() // 60) == minute:
            break
        time.sleep(1)
    assert rest == [200] * 4 + [429]
    assert [status for status, _, _ in opened] == [200] * 6
    assert all(kind.startswith("text/event-stream") for _, kind, _ in opened)
    assert all(b": stream open" in first for _, _, first in opened[:3])
    for _, _, first in opened[3:]:
        # Past the budget: come back later (at the next window), never a 429.
        assert b"event: reconnect" in first and b": stream open" not in first
        retry = int(first.split(b"retry: ")[1].split(b"\n")[0])
        assert 1000 <= retry <= 65_000
    assert b": stream open" in other[2]  # another token has a budget of its own


def test_absolute_links_use_the_public_url(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(public_url="https://sandstream.example.com")
    with stack.client() as client:
        sid = new_session(client)
        minted = client.post(f"/sessions/{sid}/stream-token").json()
        assert minted["stream_url"].startswith(
            f"https://sandstream.example.com/api/v1/sessions/{sid}/stream?token=sst_"
        )
        accepted = client.post(
            f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("hi")
        )
        assert accepted.status_code == 202
        assert accepted.json()["stream_url"].startswith("https://sandstream.example.com/api/v1/")


def test_a_turn_past_the_wait_limit_links_an_absolute_stream_url(
    stack: Stack, client: httpx.Client
) -> None:
    sid = new_session(client)
    accepted = client.post(
        f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("hi")
    )
    assert accepted.status_code == 202
    assert accepted.json()["stream_url"] == f"{stack.base_url}/api/v1/sessions/{sid}/stream?after=0"


def test_a_browser_stream_is_told_to_come_back_while_the_store_is_down(
    make_stack: Callable[..., Stack], own_redis: RedisServer
) -> None:
    stack = make_stack(redis_url_override=own_redis.url)
    with stack.client() as client:
        sid = new_session(client)
        token = client.post(f"/sessions/{sid}/stream-token").json()["token"]
    own_redis.stop()
    status, kind, first = _open_stream(stack.base_url, sid, token)
    assert status == 200 and kind.startswith("text/event-stream")
    assert b"retry: " in first and b"event: reconnect" in first
    # A client that did not ask for an event stream gets the plain 503.
    plain = httpx.get(f"{stack.base_url}/api/v1/sessions/{sid}/stream", params={"token": token})
    assert plain.status_code == 503


def test_stream_tokens_never_reach_the_logs(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(log_level="DEBUG", access_log="true")
    with stack.client() as client:
        sid = new_session(client)
        token = client.post(f"/sessions/{sid}/stream-token").json()["token"]
    _open_stream(stack.base_url, sid, token)
    httpx.get(f"{stack.base_url}/api/v1/sessions/{sid}/stream", params={"token": "sst_wrong1234"})
    stack.api.stop()  # flushes its log
    log = stack.api.log.read_text()
    assert "token=[redacted]" in log  # the access log did print those requests
    assert token not in log and "sst_wrong1234" not in log
