"""What an API process's event hub misses while its connection to Redis is
down (a Redis restart, a killed connection) is made up for when it is back:
streams and waits learn from the store itself what pub/sub did not tell them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
from conftest import Stack
from helpers import StreamReader, new_session


def _kill_pubsub_connections(url: str, stop: threading.Event) -> None:
    """Kill every pub/sub connection to Redis, again and again until `stop`."""
    client = redis.Redis.from_url(url)
    try:
        while not stop.is_set():
            client.client_kill_filter(_type="pubsub")
            stop.wait(0.02)
    finally:
        client.close()


def test_a_deletion_missed_while_the_hub_reconnects_still_ends_the_stream(
    make_stack: Callable[..., Stack],
) -> None:
    """The session is deleted while the stream's API process has no pub/sub
    connection (the deletion message goes unheard): once the hub is back, the
    stream ends with `session_deleted` (before: it sent keepalives for ever)."""
    stack = make_stack(workers=0, keepalive_seconds="1")
    url = stack.env["SANDSTREAM_REDIS_URL"]
    with stack.client() as client:
        sid = new_session(client)
        stream = StreamReader(client, sid)
        stop = threading.Event()
        killer = threading.Thread(target=_kill_pubsub_connections, args=(url, stop))
        killer.start()
        try:
            time.sleep(0.2)
            assert client.delete(f"/sessions/{sid}").status_code == 204
            time.sleep(0.2)
        finally:
            stop.set()
            killer.join(5)
        deleted_at = time.monotonic()
        events = stream.join(6)
        print(
            f"\nstream ended {time.monotonic() - deleted_at:.2f} s after the hub could hear again"
        )
        assert events and events[-1]["_event"] == "session_deleted", events
