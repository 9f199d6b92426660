"""What ends a blocking send's wait besides its turn's end: this API process
stopping (202, follow the stream) and the session's deletion (404, and its
streams end), on whichever API process the wait and the streams are."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import httpx
from conftest import ALPHA_KEY, RedisServer, Stack
from helpers import StreamReader, new_session, text_message, wait_state


def _send_in_background(
    base_url: str, sid: str, text: str
) -> tuple[threading.Thread, list[httpx.Response], list[float]]:
    replies: list[httpx.Response] = []
    done_at: list[float] = []

    def send() -> None:
        with httpx.Client(
            base_url=base_url + "/api/v1",
            headers={"Authorization": f"Bearer {ALPHA_KEY}"},
            timeout=30,
        ) as http:
            replies.append(http.post(f"/sessions/{sid}/messages", json=text_message(text)))
            done_at.append(time.monotonic())

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, replies, done_at


def test_stopping_the_api_answers_waiting_sends_with_202(
    make_stack: Callable[..., Stack],
) -> None:
    """SIGTERM while blocking sends wait on slow turns: each gets the documented
    202 (turn id, stream URL) at once, not a bare `text/plain` 500 when the
    server's shutdown timeout cancels it; the turns carry on."""
    # Turns longer than uvicorn's 5 s shutdown timeout (`api.__main__`).
    stack = make_stack(workers=1, worker_drain_seconds="1")
    with stack.client() as client:
        sids = [new_session(client) for _ in range(2)]
        sends = [_send_in_background(stack.base_url, sid, "run: sleep 8") for sid in sids]
        for sid in sids:
            wait_state(client, sid, "running")
        stopped_at = time.monotonic()
        stack.api.popen.send_signal(signal.SIGTERM)
        for thread, replies, done_at in sends:
            thread.join(10)
            assert replies, "the send got no answer"
            reply = replies[0]
            assert reply.status_code == 202, reply.text
            body = reply.json()
            assert body["state"] == "running"
            assert body["turn_id"]
            assert f"/api/v1/sessions/{body['session_id']}/stream?after=" in body["stream_url"]
            print(f"\n202 {done_at[0] - stopped_at:.3f} s after SIGTERM")
            assert done_at[0] - stopped_at < 3
        stack.api.popen.wait(10)
        # The turns go on: another API sees them running.
        other = stack.start_api()
        with httpx.Client(
            base_url=other + "/api/v1", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as http:
            for sid in sids:
                assert http.get(f"/sessions/{sid}").json()["state"] == "running"


def test_deleting_a_session_ends_its_waiting_sends_and_streams(
    make_stack: Callable[..., Stack],
) -> None:
    """DELETE while a send waits on one API process and a stream is open on
    another: the send gets 404 `session_not_found` and the stream ends with
    `session_deleted`, at once (before: the send waited out its limit and got
    202; the stream kept sending keepalives)."""
    stack = make_stack(workers=1)
    other = stack.start_api()
    with (
        stack.client() as client,
        httpx.Client(
            base_url=other + "/api/v1", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as elsewhere,
    ):
        sid = new_session(client)
        stream = StreamReader(elsewhere, sid)
        thread, replies, done_at = _send_in_background(stack.base_url, sid, "run: sleep 10")
        wait_state(client, sid, "running")
        deleted_at = time.monotonic()
        assert elsewhere.delete(f"/sessions/{sid}").status_code == 204
        thread.join(10)
        assert replies and replies[0].status_code == 404, replies and replies[0].text
        assert replies[0].json()["code"] == "session_not_found"
        events = stream.join(10)
        ended_at = time.monotonic()
        assert events[-1]["_event"] == "session_deleted"
        assert events[-1]["session_id"] == sid
        print(
            f"\nsend answered 404 {done_at[0] - deleted_at:.3f} s after DELETE; "
            f"stream ended within {ended_at - deleted_at:.3f} s"
        )
        assert done_at[0] - deleted_at < 3


def test_a_blocking_send_hears_its_turns_end_without_reading_the_log(
    make_stack: Callable[..., Stack], own_redis: RedisServer
) -> None:
    """The send's reply is expected before its claim, so the end of its turn
    comes on the reply channel: reading the session's log first cost every send
    a round trip or two to Redis."""
    stack = make_stack(workers=1, redis_url_override=own_redis.url)
    store = own_redis.client()
    with stack.client() as client:
        sid = new_session(client)
        assert client.post(f"/sessions/{sid}/messages", json=text_message("hi")).status_code == 200
        store.config_resetstat()
        for _ in range(5):
            reply = client.post(f"/sessions/{sid}/messages", json=text_message("hi"))
            assert reply.status_code == 200 and reply.json()["stop_reason"] == "end_turn"
        stats = store.info("commandstats")
    assert "cmdstat_xrange" not in stats, stats["cmdstat_xrange"]
