"""Fault injection with real processes: killed and stopped workers and API processes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from conftest import ALPHA_KEY, Stack
from helpers import (
    ResumingReader,
    StreamReader,
    free_port,
    new_session,
    run_raw_job,
    text_message,
    wait_state,
)

from shared import keys


def test_sigterm_lets_a_short_turn_finish_and_exits_zero(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(worker_drain_seconds="5")
    with stack.client() as client:
        sid = new_session(client)
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
        session = wait_state(client, sid, "active")
        reply = session["messages"][-1]
        assert reply["stop_reason"] == "end_turn"
        assert reply["content"][1]["content"] == "finished\n"


def test_sigterm_ends_long_turns_as_interrupted_after_the_grace(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(worker_drain_seconds="1")
    with stack.client() as client:
        sid = new_session(client)
        reader = StreamReader(client, sid)
        client.post(
            f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("run: sleep 30")
        )
        time.sleep(0.3)
        worker = stack.workers[0].popen
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        # A turn sent now is not taken by the stopping worker.
        other = new_session(client)
        queued = client.post(
            f"/sessions/{other}/messages", params={"wait": "0.5"}, json=text_message("hi")
        )
        assert queued.status_code == 202
        assert worker.wait(15) == 0
        assert time.monotonic() - stopped_at < 5
        events = reader.join()
        assert events[-1]["_event"] == "session_completed"
        assert events[-1]["stop_reason"] == "interrupted"
        assert wait_state(client, sid, "active")["messages"][-1]["stop_reason"] == "interrupted"
        # The next worker serves the queued turn.
        stack.start_worker()
        assert wait_state(client, other, "active")["messages"][-1]["role"] == "assistant"


def _assert_gapless(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_killed_api_process_then_reconnect_elsewhere_loses_nothing(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    second = stack.start_api()
    turns = 8
    with stack.client() as client:
        sid = new_session(client)
        reader = ResumingReader([stack.base_url, second], ALPHA_KEY, sid, until=turns)
        with httpx.Client(
            base_url=second + "/api/v1", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as sender:
            for i in range(turns):
                if i == 3:
                    stack.api.stop(signal.SIGKILL)  # the process the reader streams from
                reply = sender.post(f"/sessions/{sid}/messages", json=text_message(f"turn {i}"))
                assert reply.status_code == 200
    events = reader.join()
    assert reader.reconnects >= 1
    _assert_gapless(events)
    assert [e["_event"] for e in events].count("session_completed") == turns


def test_stopping_api_process_tells_streams_to_reconnect(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    with stack.client() as client:
        sid = new_session(client)
        lines: list[str] = []
        with client.stream("GET", f"/sessions/{sid}/stream") as response:
            chunks = response.iter_lines()
            assert next(chunks).startswith("retry:")
            stopped_at = time.monotonic()
            stack.api.popen.send_signal(signal.SIGTERM)
            lines.extend(chunks)
        assert time.monotonic() - stopped_at < 3
        assert "event: reconnect" in lines
        assert any(line.startswith("retry:") for line in lines)
        # uvicorn ends by re-raising the stop signal once it has shut down cleanly.
        assert stack.api.popen.wait(10) in (0, -signal.SIGTERM)


def test_redis_restart_with_aof_keeps_data_and_streams_resume(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    port = free_port()
    args = [
        "redis-server",
        "--port",
        str(port),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--dir",
        str(redis_dir),
    ]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        _wait_redis(url)
        stack = make_stack(redis_url_override=url)
        with stack.client() as client:
            sid = new_session(client)
            reader = ResumingReader([stack.base_url], ALPHA_KEY, sid, until=4)
            for text in ("one", "run: echo two"):
                assert client.post(f"/sessions/{sid}/messages", json=text_message(text)).is_success
            before = client.get(f"/sessions/{sid}").json()

            server.send_signal(signal.SIGTERM)
            server.wait(10)
            server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            _wait_redis(url)

            assert _eventually(lambda: client.get(f"/sessions/{sid}").json() == before)
            for text in ("three", "run: echo four"):
                reply = _eventually_reply(client, sid, text)
                assert reply.status_code == 200
            events = reader.join()
        _assert_gapless(events)
        assert [e["_event"] for e in events].count("session_completed") == 4
    finally:
        server.terminate()
        server.wait(10)


def test_redelivered_job_of_a_finished_turn_does_nothing(
    stack: Stack, client: httpx.Client, session_id: str
) -> None:
    reply = client.post(f"/sessions/{session_id}/messages", json=text_message("run: echo once"))
    turn_id = reply.json()["turn_id"]

    payload = {"session_id": session_id, "turn_id": turn_id}
    result = run_raw_job(stack.env["SANDSTREAM_REDIS_URL"], payload, f"again-{turn_id}")
    assert result == "skipped"
    messages = client.get(f"/sessions/{session_id}").json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_expired_log_is_reported_not_skipped(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(log_ttl_seconds="1")
    with stack.client() as client:
        sid = new_session(client)
        client.post(f"/sessions/{sid}/messages", json=text_message("soon forgotten"))
        time.sleep(1.5)
        with client.stream("GET", f"/sessions/{sid}/stream", params={"after": "0"}) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if "log_truncated" in line and line.startswith("data:"):
                    break
        assert "event: log_truncated" in lines


def _wait_redis(url: str) -> None:
    assert _eventually(lambda: bool(redis.Redis.from_url(url).ping()))


def _eventually(check: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def _eventually_reply(client: httpx.Client, sid: str, text: str) -> httpx.Response:
    deadline = time.monotonic() + 15
    while True:
        try:
            reply = client.post(f"/sessions/{sid}/messages", json=text_message(text))
            if reply.status_code != 503 or time.monotonic() > deadline:
                return reply
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_a_lost_reply_is_found_in_the_log(stack: Stack, client: httpx.Client) -> None:
    """The worker publishes a turn's end on the waiting API process's reply
    channel; if that message is lost, the blocking send still answers, from the
    session's log, within a keepalive interval (1 s here)."""
    sid = new_session(client)
    store = redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"])
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["reply"] = client.post(
            f"/sessions/{sid}/messages",
            params={"wait": "10"},
            json=text_message("run: sleep 0.5"),
        )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 5
    while not store.hget(keys.session(sid), "reply_to"):
        assert time.monotonic() < deadline, "the claim named no reply channel"
        time.sleep(0.01)
    store.hset(keys.session(sid), "reply_to", "ss:api:nobody:replies")  # lost
    sender.join(15)
    assert result["reply"].status_code == 200
    assert result["reply"].json()["role"] == "assistant"
