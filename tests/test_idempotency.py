"""Idempotency-Key: retries get the first outcome, never a second effect."""

from __future__ import annotations

import threading
import uuid

import httpx
from conftest import Stack
from helpers import text_message


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
