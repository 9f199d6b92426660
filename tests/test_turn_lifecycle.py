"""Turns that end abnormally: lost workers, turns interrupted in the queue, a capped log."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import Stack
from helpers import StreamReader, new_session, run_raw_job, text_message, wait_state

from shared import keys


def _api(stack: Stack) -> httpx.Client:
    return stack.client()


def test_killed_worker_ends_the_turn_with_worker_lost(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(
        lease_seconds="1.5", lease_grace_seconds="0.5", reaper_interval_seconds="0.5"
    )
    with _api(stack) as client:
        sid = new_session(client)
        reader = StreamReader(client, sid)
        accepted = client.post(
            f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("run: sleep 3")
        )
        assert accepted.status_code == 202
        time.sleep(0.5)  # the worker has started the turn
        stack.workers[0].stop(signal.SIGKILL)
        stack.start_worker()  # any live worker's reaper notices the lapsed lease

        events = reader.join(20)
        assert events[-1]["_event"] == "session_failed"
        assert events[-1]["stop_reason"] == "worker_lost"
        assert events[-1]["turn_id"] == accepted.json()["turn_id"]
        assert wait_state(client, sid, "active")["state"] == "active"
        after = client.post(f"/sessions/{sid}/messages", json=text_message("hello again"))
        assert after.status_code == 200


def test_interrupting_a_queued_turn_ends_it_at_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(workers=0)
    with _api(stack) as client:
        sid = new_session(client)
        accepted = client.post(
            f"/sessions/{sid}/messages", params={"wait": "0.1"}, json=text_message("hi")
        )
        assert accepted.status_code == 202
        interrupted = client.post(f"/sessions/{sid}/interrupt")
        assert interrupted.status_code == 200 and interrupted.json()["interrupted"] is True
        session = client.get(f"/sessions/{sid}").json()
        assert session["state"] == "active"
        assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
        assert session["messages"][1]["stop_reason"] == "interrupted"

        # A worker that arrives later skips the stale job and serves the next turn.
        stack.start_worker()
        reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: echo ok"))
        assert reply.status_code == 200
        assert reply.json()["content"][1]["content"] == "ok\n"
        assert len(client.get(f"/sessions/{sid}").json()["messages"]) == 4


def test_queued_turn_starts_when_a_worker_arrives(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(workers=0)
    with _api(stack) as client:
        sid = new_session(client)
        accepted = client.post(
            f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("run: echo late")
        )
        assert accepted.status_code == 202
        stack.start_worker()
        session = wait_state(client, sid, "active")
        assert session["messages"][-1]["content"][1]["content"] == "late\n"


def test_resume_from_before_the_retained_log_says_so(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(log_max_events="10")
    with _api(stack) as client:
        sid = new_session(client)
        for i in range(25):
            client.post(f"/sessions/{sid}/messages", json=text_message(f"message {i}"))
        with client.stream("GET", f"/sessions/{sid}/stream", params={"after": "0"}) as response:
            lines = response.iter_lines()
            frames: list[str] = []
            for line in lines:
                frames.append(line)
                if line.startswith("data:") and '"type":"log_truncated"' in line:
                    break
        event_line = frames[-2]
        assert event_line == "event: log_truncated"
        # No id but the stream's opening cursor: the notice does not move it.
        assert [f for f in frames if f.startswith("id:")] == ["id: 0"]


@pytest.mark.parametrize(
    "payload",
    [
        {"session_id": "../../etc", "turn_id": "x"},
        {"session_id": "not-a-uuid", "turn_id": "also-not"},
        {"session_id": str(uuid.uuid4())},
        ["a", "list"],
        {"session_id": str(uuid.uuid4()), "turn_id": str(uuid.uuid4()), "extra": "field"},
    ],
)
def test_worker_rejects_malformed_jobs(stack: Stack, client: httpx.Client, payload: Any) -> None:
    result = run_raw_job(stack.env["SANDSTREAM_REDIS_URL"], payload, f"bad-{uuid.uuid4()}")
    assert result == "rejected"
    # The worker is unharmed and serves real turns.
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
    assert client.post(f"/sessions/{sid}/messages", json=text_message("ok?")).status_code == 200


def test_jobs_left_waiting_for_a_slot_start_when_one_frees(
    make_stack: Callable[..., Stack],
) -> None:
    """A worker with one slot, three turns queued at once: each starts as the
    previous ends, not at the next fallback poll (5 s by default)."""
    stack = make_stack(worker_max_jobs="1")
    with stack.client() as client:
        sessions = [new_session(client) for _ in range(3)]
        started = time.monotonic()
        for sid in sessions:
            sent = client.post(
                f"/sessions/{sid}/messages",
                params={"wait": "0"},
                json=text_message("run: sleep 0.3"),
            )
            assert sent.status_code == 202
        for sid in sessions:
            wait_state(client, sid, "active")
        assert time.monotonic() - started < 4


def test_a_turn_whose_sandbox_is_gone_fails_with_sandbox_unavailable(
    stack: Stack, client: httpx.Client
) -> None:
    """The worker cannot give the turn a sandbox: the turn fails, and says why."""
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
    redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"]).delete(keys.sandbox(sandbox))
    reply = client.post(f"/sessions/{sid}/messages", params={"wait": "20"}, json=text_message("hi"))
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["code"] == "sandbox_unavailable"
    session = wait_state(client, sid, "active")
    assert session["messages"][-1]["role"] == "user"
