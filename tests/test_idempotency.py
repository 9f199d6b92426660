"""Idempotency-Key: retries get the first outcome, never a second effect."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import msgspec
import pytest
from conftest import Proc, RedisServer, Stack
from helpers import PausableProxy, failed_event, free_port, new_session, text_message
from redis.asyncio import Redis

from api.idempotency import IdemClaim
from api.services import Services
from bench.harness import user_message
from shared import keys
from shared.models import new_id
from shared.queue import TurnJob, queued_job
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings
from shared.store import SessionStore
from shared.turns import IdemRecord, Settlement


def test_concurrent_retries_of_one_send_make_one_turn(
    stack: Stack, client: httpx.Client, session_id: str
) -> None:
    key = str(uuid.uuid4())
    replies: list[httpx.Response] = []

    def send() -> None:
        with stack.client() as own:
            replies.append(
                own.post(
                    f"/sessions/{session_id}/messages",
                    json=text_message("run: echo once >> count.txt; cat count.txt"),
                    headers={"Idempotency-Key": key},
                )
            )

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert [r.status_code for r in replies] == [200, 200, 200]
    assert len({r.json()["id"] for r in replies}) == 1
    messages = client.get(f"/sessions/{session_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"][1]["content"] == "once\n"

    later = client.post(
        f"/sessions/{session_id}/messages",
        json=text_message("run: echo once >> count.txt; cat count.txt"),
        headers={"Idempotency-Key": key},
    )
    assert later.status_code == 200 and later.json() == replies[0].json()
    assert len(client.get(f"/sessions/{session_id}").json()["messages"]) == 2


def test_same_key_with_another_body_is_422(client: httpx.Client, session_id: str) -> None:
    key = str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    first = client.post(f"/sessions/{session_id}/messages", json=text_message("a"), headers=headers)
    assert first.status_code == 200
    other = client.post(f"/sessions/{session_id}/messages", json=text_message("b"), headers=headers)
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    assert len(client.get(f"/sessions/{session_id}").json()["messages"]) == 2


def test_retry_of_a_refused_send_may_go_through(client: httpx.Client, session_id: str) -> None:
    running = client.post(
        f"/sessions/{session_id}/messages", params={"wait": "0"}, json=text_message("run: sleep 1")
    )
    assert running.status_code == 202
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    refused = client.post(
        f"/sessions/{session_id}/messages", json=text_message("x"), headers=headers
    )
    assert refused.status_code == 409
    client.post(f"/sessions/{session_id}/interrupt")
    retried = client.post(
        f"/sessions/{session_id}/messages", json=text_message("x"), headers=headers
    )
    assert retried.status_code == 200


def test_retried_creates_return_the_same_resource(client: httpx.Client) -> None:
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    sandboxes = [
        client.post("/sandboxes", json={"metadata": {"n": 1}}, headers=headers) for _ in range(3)
    ]
    assert {r.status_code for r in sandboxes} == {201}
    assert len({r.json()["id"] for r in sandboxes}) == 1
    sandbox = sandboxes[0].json()["id"]
    listed = [s["id"] for s in client.get("/sandboxes", params={"limit": "200"}).json()]
    assert listed.count(sandbox) == 1

    headers = {"Idempotency-Key": str(uuid.uuid4())}
    sessions = [
        client.post(f"/sandboxes/{sandbox}/sessions", json={"metadata": {}}, headers=headers)
        for _ in range(3)
    ]
    assert len({r.json()["id"] for r in sessions}) == 1
    assert len(client.get(f"/sandboxes/{sandbox}/sessions").json()) == 1


def test_keys_are_per_tenant(stack: Stack, client: httpx.Client) -> None:
    from conftest import BETA_KEY

    headers = {"Idempotency-Key": "shared-key-" + uuid.uuid4().hex}
    mine = client.post("/sandboxes", json={}, headers=headers).json()["id"]
    with stack.client(BETA_KEY) as beta:
        theirs = beta.post("/sandboxes", json={}, headers=headers).json()["id"]
    assert mine != theirs


@contextmanager
def _proxied_api(stack: Stack) -> Iterator[tuple[httpx.Client, PausableProxy]]:
    """A client of another API process of the stack, whose Redis is behind a proxy
    that can lose replies (a 1 s socket timeout, `make_stack`'s settings)."""
    host_port, db = stack.env["SANDSTREAM_REDIS_URL"].rsplit("/", 1)
    proxy = PausableProxy(int(host_port.rsplit(":", 1)[1]))
    port = free_port()
    api = Proc(
        [sys.executable, "-m", "api"],
        {
            **stack.env,
            "SANDSTREAM_PORT": str(port),
            "SANDSTREAM_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{db}",
        },
        stack.workdir / "api-proxied.log",
    )
    stack.procs.append(api)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and api.popen.poll() is None
            time.sleep(0.1)
        with stack.client() as direct:
            headers = direct.headers
        with httpx.Client(base_url=base + "/api/v1", headers=headers, timeout=30) as client:
            yield client, proxy
    finally:
        proxy.stop()


def test_a_send_whose_reply_from_redis_was_lost_is_replayed_on_retry(
    make_stack: Callable[..., Stack],
) -> None:
    """The claim's script ran, its reply never came back: the API answers 503,
    though the turn is queued. A retry with the same key replays that turn,
    instead of finding the session running (409) or, once the turn is over,
    making a second one."""
    stack = make_stack(redis_socket_timeout_seconds="1")
    with _proxied_api(stack) as (proxied, proxy), stack.client() as client:
        sid = new_session(client)
        # A first turn, so that Redis knows the claim's script: the lost call is
        # then the claim itself, not a NOSCRIPT answer.
        assert proxied.post(f"/sessions/{sid}/messages", json=text_message("hi")).is_success
        text = f"run: sleep 1; echo {uuid.uuid4().hex}"
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        proxy.drop_replies_to(text.encode())
        lost = proxied.post(f"/sessions/{sid}/messages", json=text_message(text), headers=headers)
        assert proxy.dropped == 1
        assert lost.status_code == 503, lost.text
        stored = client.get(f"/sessions/{sid}").json()["messages"]
        assert stored[-1]["content"] == text_message(text)["content"]  # it landed
        retried = proxied.post(
            f"/sessions/{sid}/messages", json=text_message(text), headers=headers
        )
        assert retried.status_code == 200, retried.text
        reply = retried.json()
        assert reply["role"] == "assistant" and reply["turn_id"] == stored[-1]["turn_id"]
        messages = client.get(f"/sessions/{sid}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2
        assert messages[3] == reply
        # And once the turn is over, another retry still replays it.
        again = client.post(f"/sessions/{sid}/messages", json=text_message(text), headers=headers)
        assert again.status_code == 200 and again.json() == reply
        assert len(client.get(f"/sessions/{sid}").json()["messages"]) == 4


@pytest.mark.parametrize("what", ["sandbox", "session"])
def test_a_create_whose_reply_from_redis_was_lost_is_replayed_on_retry(
    make_stack: Callable[..., Stack], what: str
) -> None:
    """The create's write went in, its reply never came back (503): a retry with
    the same key gets what it made, not a second one."""
    stack = make_stack(redis_socket_timeout_seconds="1")
    with _proxied_api(stack) as (proxied, proxy), stack.client() as client:
        sandbox = client.post("/sandboxes", json={}).json()["id"]
        path = "/sandboxes" if what == "sandbox" else f"/sandboxes/{sandbox}/sessions"
        marker = uuid.uuid4().hex
        body = {"metadata": {"marker": marker}}
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        proxy.drop_replies_to(marker.encode())
        lost = proxied.post(path, json=body, headers=headers)
        assert proxy.dropped == 1
        assert lost.status_code == 503, lost.text
        retried = proxied.post(path, json=body, headers=headers)
        assert retried.status_code == 201, retried.text
        made = [r for r in client.get(path, params={"limit": "200"}).json()]
        assert [r["id"] for r in made if r["metadata"] == {"marker": marker}] == [
            retried.json()["id"]
        ]
        if what == "sandbox":  # its workspace is ready: a file goes in
            put = client.put(f"/sandboxes/{retried.json()['id']}/files/a.txt", content=b"hello")
            assert put.is_success, put.text


def test_a_request_whose_claim_expired_leaves_the_key_to_the_one_that_took_it(
    own_redis: RedisServer,
) -> None:
    """Request A's pending claim expired and a retry B (same key, same body) took
    the key: A's effect, written late, does not settle B's record, nor does A's
    failure drop it. With the key free, A's effect settles it."""

    async def scenario() -> None:
        # A Redis of its own: no worker takes the turns it queues.
        client = Redis.from_url(own_redis.url)
        store = SessionStore(client)
        settings = Settings()
        svc = cast(Services, SimpleNamespace(redis=client, settings=settings, store=store))
        digest = "d" * 64

        def pending(claim: str) -> bytes:
            return msgspec.json.encode(IdemRecord(digest=digest, state="pending", claim=claim))

        mine, theirs = pending("a"), pending("b")
        key = f"ss:idem:test:{uuid.uuid4().hex}"
        settles = Settlement(key, digest, 60, mine)
        try:
            sandbox = await store.create_sandbox("t", {})
            await client.set(key, theirs)
            await IdemClaim(svc, key, digest, mine).abandon()
            assert await client.get(key) == theirs
            await store.create_session("t", sandbox.id, {}, settings.default_agent(), settles)
            assert await client.get(key) == theirs
            sid = (await store.create_session("t", sandbox.id, {}, settings.default_agent())).id

            async def claim(text: str) -> str:
                """A send with the key: its turn, claimed and queued."""
                turn = new_id()
                job = queued_job(TurnJob(session_id=sid, turn_id=turn))
                claimed = await store.claim_turn(
                    sid, "t", turn, user_message(sid, turn, text), job, "", settles
                )
                assert claimed.status == "ok"
                return turn

            turn = await claim("hi")
            assert await client.get(key) == theirs
            await IdemClaim(svc, key, digest, theirs).abandon()  # B's own: dropped
            assert await client.get(key) is None
            await store.finish_turn(
                sid, turn, "unstarted", None, failed_event(sid, sandbox.id, turn)
            )
            turn = await claim("again")
            record = msgspec.json.decode(await client.get(key) or b"", type=IdemRecord)
            assert (record.state, record.resource_id, record.digest) == ("done", turn, digest)
            assert record.after == int(await client.get(keys.seq(sid)) or 0)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_workspace_made_by_two_requests_at_once_is_made_once(tmp_path: Path) -> None:
    """Two requests for one sandbox (a create and its replay) prepare its
    workspace at the same moment: both succeed."""
    failures: list[BaseException] = []

    def prepare(sandbox: str, start: threading.Barrier) -> None:
        start.wait()
        try:
            prepare_workspace(str(tmp_path), sandbox, None, None)
        except BaseException as exc:  # reported below
            failures.append(exc)

    for _ in range(50):
        sandbox, start = new_id(), threading.Barrier(2)
        threads = [threading.Thread(target=prepare, args=(sandbox, start)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert failures == []


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "symlink to a directory", "fifo"])
def test_a_workspace_path_taken_by_something_else_is_refused(tmp_path: Path, kind: str) -> None:
    """Preparing a workspace takes only a directory of its own at its path (a
    create and its replay may make it at once): anything else there is an error,
    never followed or used as the workspace."""
    root = tmp_path / "root"
    root.mkdir()
    sandbox = new_id()
    path = root / sandbox
    if kind == "file":
        path.write_bytes(b"")
    elif kind == "dangling symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "symlink to a directory":
        (tmp_path / "elsewhere").mkdir()
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    with pytest.raises(NotADirectoryError):
        prepare_workspace(str(root), sandbox, None, None)
    assert not (tmp_path / "nowhere").exists()
