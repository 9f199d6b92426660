"""A stream's memory in the API does not grow with the log or with a client's
slowness: replays go page by page, a client's pending events are capped in
bytes, a client that accepts nothing is dropped, and the memory comes back.

Measured on a real API process (its RSS from /proc) with real sockets that stop
reading; the log is filled through the store's append script, as a worker
fills it, to keep the tests fast.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from conftest import ADMIN_KEY, ALPHA_KEY, Stack
from helpers import new_session, wait_until

from bench.replay import EVENT_BYTES, fill_log
from shared import keys

MB = 1 << 20


def _rss_mb(stack: Stack) -> float:
    status = Path(f"/proc/{stack.api.popen.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) / 1024


def _open_streams(stack: Stack) -> float:
    response = httpx.get(
        stack.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    match = re.search(r"^sandstream_sse_connections (\S+)$", response.text, re.M)
    assert match, response.text[:500]
    return float(match.group(1))


def _append(stack: Stack, sid: str, total_bytes: int) -> int:
    """Tool results of EVENT_BYTES through the store's append script, `total_bytes`
    in all, for the session's turn (claimed, no worker runs it); the last seq."""
    return fill_log(stack.env["SANDSTREAM_REDIS_URL"], sid, "alpha", total_bytes)


def _stuck_stream(stack: Stack, sid: str, after: int | None) -> socket.socket:
    """A stream opened by a client that then reads nothing (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", stack.port))
    query = "" if after is None else f"?after={after}"
    sock.sendall(
        f"GET /api/v1/sessions/{sid}/stream{query} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {ALPHA_KEY}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


def _warm_up(stack: Stack, client: httpx.Client) -> float:
    """Take each code path once (a replay, a live stream), then the idle RSS."""
    sid = new_session(client)
    _append(stack, sid, 2 * MB)
    with client.stream("GET", f"/sessions/{sid}/stream", params={"after": "0"}) as response:
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received >= MB:
                break
    wait_until(lambda: _open_streams(stack) == 0, 10, "the warm-up stream to close")
    time.sleep(1.5)  # the trim after a stream ends
    return _rss_mb(stack)


def _peak_rss(stack: Stack, seconds: float) -> float:
    peak = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, _rss_mb(stack))
        time.sleep(0.05)
    return peak


def test_five_stalled_replays_of_a_100_mb_log_stay_within_100_mb(
    make_stack: Callable[..., Stack],
) -> None:
    """Five clients open `?after=0` on a ~100 MB log and read nothing: the API
    reads a page for each and waits (before: the whole log per stream, 60 MB ->
    1,037 MB)."""
    stack = make_stack(workers=0)
    with stack.client() as client:
        idle = _warm_up(stack, client)
        sid = new_session(client)
        last = _append(stack, sid, 100 * MB)
        started = time.monotonic()
        sockets = [_stuck_stream(stack, sid, 0) for _ in range(5)]
        try:
            wait_until(lambda: _open_streams(stack) == 5, 10, "five streams")
            peak = _peak_rss(stack, 3)
        finally:
            for sock in sockets:
                sock.close()
        wait_until(lambda: _open_streams(stack) == 0, 10, "the streams to close")
        # Freed memory goes back a second after the streams end (`api.memory`).
        wait_until(lambda: _rss_mb(stack) - idle < 20, 10, "the API's memory to come back")
        after = _rss_mb(stack)
        print(
            f"\nlog {last} events (~{last * EVENT_BYTES // MB} MB); API RSS idle {idle:.0f} MB, "
            f"peak with 5 stalled replays {peak:.0f} MB (+{peak - idle:.0f}), "
            f"after they closed {after:.0f} MB (+{after - idle:.0f}); "
            f"{time.monotonic() - started:.1f} s"
        )
        assert peak - idle < 100
        assert after - idle < 20
        redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"]).delete(keys.log(sid))


def test_a_stuck_client_is_dropped_and_its_memory_comes_back(
    make_stack: Callable[..., Stack],
) -> None:
    """A client that stops reading while large tool results flow holds at most
    its byte cap, is dropped after the write timeout (its connection closed),
    and the API's RSS returns to within 20 MB of idle (before: 59 -> 129 MB, and
    168 MB after it drained, never given back; nothing dropped it)."""
    stack = make_stack(workers=0, stream_write_timeout_seconds="2")
    with stack.client() as client:
        idle = _warm_up(stack, client)
        sid = new_session(client)
        _append(stack, sid, 1 * MB)
        sockets = [_stuck_stream(stack, sid, None) for _ in range(4)]
        try:
            wait_until(lambda: _open_streams(stack) == 4, 10, "four streams")
            started = time.monotonic()
            _append(stack, sid, 40 * MB)  # live, while the clients read nothing
            peak = _peak_rss(stack, 0.5)
            wait_until(lambda: _open_streams(stack) == 0, 10, "the stuck clients to be dropped")
            dropped_after = time.monotonic() - started
            # Dropped: the server closed the connection (what it had sent, then EOF).
            sockets[0].settimeout(10)
            while sockets[0].recv(1 << 16):
                pass
        finally:
            for sock in sockets:
                sock.close()
        wait_until(lambda: _rss_mb(stack) - idle < 20, 10, "the API's memory to come back")
        after = _rss_mb(stack)
        print(
            f"\nAPI RSS idle {idle:.0f} MB, peak with 4 stuck clients during 40 MB of "
            f"events {peak:.0f} MB (+{peak - idle:.0f}), after they were dropped "
            f"{after:.0f} MB (+{after - idle:.0f}); dropped {dropped_after:.1f} s after "
            "the events started (write timeout 2 s)"
        )
        assert after - idle < 20
        redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"]).delete(keys.log(sid))
