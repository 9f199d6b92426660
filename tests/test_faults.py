"""Fault injection with real processes: killed and stopped workers and API processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
from conftest import Stack
from helpers import StreamReader, text_message


def _session(client: httpx.Client) -> str:
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    return str(client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"])


def _wait_state(client: httpx.Client, sid: str, state: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        session: dict[str, Any] = client.get(f"/sessions/{sid}").json()
        if session["state"] == state:
            return session
        assert time.monotonic() < deadline, f"session stayed {session['state']}"
        time.sleep(0.05)


def test_sigterm_lets_a_short_turn_finish_and_exits_zero(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(worker_drain_seconds="5")
    with stack.client() as client:
        sid = _session(client)
        accepted = client.post(
            f"/sessions/{sid}/messages",
            params={"wait": "0"},
            json=text_message("run: sleep 1; echo finished"),
        )
        assert accepted.status_code == 202
        time.sleep(0.3)
        worker = stack.workers[0].popen
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
        session = _wait_state(client, sid, "active")
        reply = session["messages"][-1]
        assert reply["stop_reason"] == "end_turn"
        assert reply["content"][1]["content"] == "finished\n"


def test_sigterm_ends_long_turns_as_interrupted_after_the_grace(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(worker_drain_seconds="1")
    with stack.client() as client:
        sid = _session(client)
        reader = StreamReader(client, sid)
        client.post(
            f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("run: sleep 30")
        )
        time.sleep(0.3)
        worker = stack.workers[0].popen
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        # A turn sent now is not taken by the stopping worker.
        other = _session(client)
        queued = client.post(
            f"/sessions/{other}/messages", params={"wait": "0.5"}, json=text_message("hi")
        )
        assert queued.status_code == 202
        assert worker.wait(15) == 0
        assert time.monotonic() - stopped_at < 5
        events = reader.join()
        assert events[-1]["_event"] == "session_completed"
        assert events[-1]["stop_reason"] == "interrupted"
        assert _wait_state(client, sid, "active")["messages"][-1]["stop_reason"] == "interrupted"
        # The next worker serves the queued turn.
        stack.start_worker()
        assert _wait_state(client, other, "active")["messages"][-1]["role"] == "assistant"
