"""Redis going away: 503 problem details while it is down, and recovery after."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import redis
from conftest import ADMIN_KEY, RedisServer, Stack
from helpers import StreamReader, free_port, text_message

from shared import scripts
from worker import pickup


def _metrics(stack: Stack) -> str:
    response = httpx.get(
        stack.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert response.status_code == 200
    return response.text


def test_requests_get_503_while_redis_is_down(own_redis: RedisServer, tmp_path: Path) -> None:
    stack = Stack(own_redis.url, tmp_path / "stack", {"SANDSTREAM_RATE_LIMIT_PER_MINUTE": "600"})
    try:
        with stack.client() as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            assert "sandstream_redis_up 1" in _metrics(stack)
            own_redis.stop()
            # The scrape still answers, saying what it cannot reach.
            assert "sandstream_redis_up 0" in _metrics(stack)
            for method, url in [
                ("GET", f"/sandboxes/{sandbox}"),
                ("POST", f"/sandboxes/{sandbox}/sessions"),
                ("GET", stack.base_url + "/readyz"),
            ]:
                response = client.request(method, url, json={} if method == "POST" else None)
                assert response.status_code == 503, response.text
                assert response.headers["content-type"].startswith("application/problem+json")
                assert response.json()["code"] == "store_unavailable"
    finally:
        stack.stop()


def test_hub_and_worker_reconnect_after_a_redis_restart(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    stack = Stack(own_redis.url, tmp_path / "stack", {})
    try:
        with stack.client() as client:
            client.post("/sandboxes", json={})
            own_redis.stop()
            time.sleep(0.5)
            own_redis.start()  # an empty Redis; the API and the worker must find it again
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            sid2 = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
            late = StreamReader(client, sid2)
            time.sleep(1.5)  # the worker reconnects too
            reply = client.post(f"/sessions/{sid2}/messages", json=text_message("back"))
            assert reply.status_code == 200
            assert late.join()[-1]["_event"] == "session_completed"
    finally:
        stack.stop()


def test_readyz_needs_redis_to_take_writes(own_redis: RedisServer, tmp_path: Path) -> None:
    stack = Stack(own_redis.url, tmp_path / "stack", {})
    try:
        ready = stack.base_url + "/readyz"
        assert httpx.get(ready).status_code == 200
        store = redis.Redis.from_url(own_redis.url)
        # A replica of a primary that is not there: it answers, and refuses writes.
        store.replicaof("127.0.0.1", str(free_port()))
        refused = httpx.get(ready)
        assert refused.status_code == 503
        assert refused.json()["code"] == "queue_not_writable"
        store.replicaof("NO", "ONE")
        assert httpx.get(ready).status_code == 200
        own_redis.stop()
        down = httpx.get(ready)
        assert down.status_code == 503 and down.json()["code"] == "store_unavailable"
    finally:
        stack.stop()


def test_the_api_and_the_worker_load_their_scripts_as_they_start(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Each process loads the scripts it calls as it starts, so a fresh fleet's
    first sends and turns are not refused (NOSCRIPT) and load them call by call:
    the streaming benchmark's 200 first turns made 34 loads and as many refused
    calls. A Redis that loses them later (restarted, above) still gets them
    back by the first call that finds them gone."""
    stack = Stack(own_redis.url, tmp_path / "stack", {})
    try:
        store = own_redis.client()
        sources = [
            scripts.CLAIM_TURN,
            scripts.START_TURN,
            scripts.APPEND_EVENTS,
            scripts.FINISH_TURN,
            scripts.WORKER_HEARTBEAT,
            pickup._TAKE_JOB,
            pickup._FORGET_JOB,
        ]
        shas = [hashlib.sha1(source.encode()).hexdigest() for source in sources]
        assert store.script_exists(*shas) == [True] * len(shas)
        with stack.client() as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
            reply = client.post(f"/sessions/{sid}/messages", json=text_message("hi"))
            assert reply.status_code == 200, reply.text
        assert "errorstat_NOSCRIPT" not in store.info("errorstats")
    finally:
        stack.stop()
