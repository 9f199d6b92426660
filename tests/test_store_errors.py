"""A store that cannot serve (out of memory, a replica, loading, busy) answers
503 `store_unavailable` with `Retry-After`, never 500; and it all works again
once the store does."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import RedisServer, Stack
from helpers import text_message, wait_state
from redis._parsers import _RESP2Parser

from shared.turns import store_unavailable


def _assert_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "store_unavailable"
    assert int(response.headers["retry-after"]) > 0


def test_a_full_store_answers_503_and_recovers(own_redis: RedisServer, tmp_path: Path) -> None:
    """`maxmemory` reached (`noeviction`): send, create, stream-token and
    interrupt answer 503 (before: 500 `internal_error`); after the limit is
    lifted, each works."""
    stack = Stack(own_redis.url, tmp_path / "stack", {"SANDSTREAM_KEEPALIVE_SECONDS": "1"})
    store = own_redis.client()
    try:
        with stack.client() as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
            busy = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
            running = client.post(
                f"/sessions/{busy}/messages",
                params={"wait": "0"},
                json=text_message("run: sleep 2"),
            )
            assert running.status_code == 202
            wait_state(client, busy, "running")
            used = int(store.info("memory")["used_memory"])
            store.config_set("maxmemory-policy", "noeviction")
            store.config_set("maxmemory", str(used - (1 << 20)))
            try:
                _assert_503(client.post(f"/sessions/{sid}/messages", json=text_message("hi")))
                _assert_503(client.post(f"/sandboxes/{sandbox}/sessions", json={}))
                _assert_503(client.post(f"/sessions/{sid}/stream-token"))
                _assert_503(client.post(f"/sessions/{busy}/interrupt"))
            finally:
                store.config_set("maxmemory", "0")
            reply = client.post(f"/sessions/{sid}/messages", json=text_message("hi"))
            assert reply.status_code == 200, reply.text
            assert client.post(f"/sandboxes/{sandbox}/sessions", json={}).status_code == 201
            assert client.post(f"/sessions/{sid}/stream-token").status_code == 201
            assert client.post(f"/sessions/{busy}/interrupt").status_code == 200
    finally:
        store.close()
        stack.stop()


def _parsed(reply: str) -> Exception:
    """The exception redis-py raises for an error reply."""
    error: Exception = _RESP2Parser(65536).parse_error(reply)
    return error


@pytest.mark.parametrize(
    "reply",
    [
        "OOM command not allowed when used memory > 'maxmemory'.",
        "READONLY You can't write against a read only replica.",
        "LOADING Redis is loading the dataset in memory",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "NOREPLICAS Not enough good replicas to write.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
    ],
)
def test_the_replies_of_a_store_that_cannot_serve_now_are_unavailable(reply: str) -> None:
    assert store_unavailable(_parsed(reply))


def test_a_rejected_command_is_not_unavailable() -> None:
    """A bug (a wrong command) stays a 500 with its context logged."""
    assert not store_unavailable(_parsed("WRONGTYPE Operation against a key"))
    assert not store_unavailable(_parsed("ERR unknown command 'FOO'"))


def test_a_stalled_store_answers_503_within_the_socket_timeout(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis stopped (SIGSTOP: it holds the connections and answers nothing, as
    in a failover or a partition): a request gets 503 after the API's socket
    timeout instead of hanging; it answers again once Redis does."""
    stack = Stack(
        own_redis.url, tmp_path / "stack", {"SANDSTREAM_REDIS_SOCKET_TIMEOUT_SECONDS": "1"}
    )
    assert own_redis.proc is not None
    try:
        with stack.client() as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                response = client.get(f"/sandboxes/{sandbox}")
                took = time.monotonic() - started
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            _assert_503(response)
            print(f"\n503 after {took:.2f} s (socket timeout 1 s)")
            assert took < 5
            assert client.get(f"/sandboxes/{sandbox}").status_code == 200
    finally:
        stack.stop()


def test_a_send_refused_by_a_stalled_store_can_be_retried_with_its_key(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """A send with an Idempotency-Key while Redis is stopped answers 503 ("retry
    shortly"), and its key, which the failed request could not let go, holds
    only for `SANDSTREAM_IDEMPOTENCY_PENDING_SECONDS`: the retry goes through
    (before: it waited 10 s for a first request long dead, then got 409
    `idempotency_pending`, and so did every retry for the key's whole day)."""
    settings = {
        "SANDSTREAM_REDIS_SOCKET_TIMEOUT_SECONDS": "0.3",
        "SANDSTREAM_IDEMPOTENCY_PENDING_SECONDS": "1",
    }
    stack = Stack(own_redis.url, tmp_path / "stack", settings)
    assert own_redis.proc is not None
    try:
        with stack.client() as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
            message, key = text_message("hello"), {"Idempotency-Key": f"send-{sid}"}
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                refused = client.post(f"/sessions/{sid}/messages", json=message, headers=key)
                time.sleep(0.5)  # the request's last calls time out as well
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)
            _assert_503(refused)
            started = time.monotonic()
            retried = client.post(f"/sessions/{sid}/messages", json=message, headers=key)
            took = time.monotonic() - started
            print(f"\nthe retry with the key answered {retried.status_code} after {took:.2f} s")
            assert retried.status_code == 200, retried.text
            assert took < 5
            users = [
                m for m in client.get(f"/sessions/{sid}").json()["messages"] if m["role"] == "user"
            ]
            assert len(users) == 1
    finally:
        stack.stop()
