"""Replay of a long session log: one client resumes with `?after=0` on a log of
tool results (64 KB each) and reads the stream to its end.

Reported: the time to the first event and to the last, and the API's resident
memory above idle while it replays; against a baseline of the same run, one
Redis client reading the whole log with a single XRANGE (what a replay did
before it went page by page: the first event went out only after that).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid

import httpx
import redis

from bench.harness import AUTH, new_session, rss_bytes, service, user_message
from shared import keys
from shared.events import ToolResult
from shared.models import now_rfc3339
from shared.queue import connect
from shared.store import SessionStore

EVENT_BYTES = 64 * 1024


def fill_log(redis_url: str, sid: str, tenant: str, total_bytes: int) -> int:
    """Append tool results of EVENT_BYTES to the session's log through the
    store's append script, `total_bytes` in all, for its running turn or one
    claimed here (no worker runs it); returns the last seq."""

    async def run() -> int:
        client = await connect(redis_url)
        store = SessionStore(client, log_max_events=1_000_000, log_ttl_seconds=3600)
        state = await store.turn_state(sid)
        if state is not None and state.turn_id is not None:
            turn_id = state.turn_id
        else:
            turn_id = str(uuid.uuid4())
            message = user_message(sid, turn_id, "x")
            assert (await store.claim_turn(sid, tenant, turn_id, message)).status == "ok"
        event = ToolResult(
            session_id=sid,
            sandbox_id="s",
            turn_id=turn_id,
            message_id="m",
            created_at=now_rfc3339(),
            index=0,
            tool_use_id="t",
            content="a" * EVENT_BYTES,
            is_error=False,
        )
        last = 0
        for _ in range(total_bytes // (EVENT_BYTES * 25)):
            last = (await store.append_events(sid, turn_id, [event] * 25))[-1]
        await client.aclose()
        return last

    return asyncio.run(run())


def _replay(port: int, sid: str, last: int, pid: int) -> tuple[float, float, int]:
    """(seconds to the first event, to the last, peak RSS) of one reading client."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marker = f"id: {last}\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(
            f"GET /api/v1/sessions/{sid}/stream?after=0 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {AUTH['Authorization']}\r\n\r\n".encode()
        )
        first = 0.0
        tail = b""
        while True:
            chunk = sock.recv(1 << 20)
            assert chunk, "the stream ended early"
            window = tail + chunk
            if not first and b"event: tool_result" in window:
                first = time.monotonic() - started
            if marker in window:
                break
            tail = window[-64:]
        total = time.monotonic() - started
    done.set()
    sampler.join()
    return first, total, peak


def bench_replay(redis_url: str, megabytes: int) -> list[list[str]]:
    with service(redis_url, workers=0) as svc:
        pid = svc.api_pids[0]
        with httpx.Client(base_url=svc.base + "/api/v1", timeout=60, headers=AUTH) as c:
            sid = new_session(c)
        last = fill_log(redis_url, sid, "bench", megabytes << 20)
        port = int(svc.base.rsplit(":", 1)[1])
        idle = rss_bytes(pid)
        first, total, peak = _replay(port, sid, last, pid)
        store = redis.Redis.from_url(redis_url)
        started = time.monotonic()
        entries = store.xrange(keys.log(sid))
        whole = time.monotonic() - started
        assert len(entries) == last
        del entries
        store.delete(keys.log(sid))
        store.close()
    mib = 1 << 20
    return [
        [
            f"sandstream, {megabytes} MB log",
            f"{first * 1000:.1f}",
            f"{total * 1000:.0f}",
            f"{(peak - idle) / mib:.0f}",
            f"{first / whole:.3f}x",
        ],
        ["one XRANGE of the whole log", f"{whole * 1000:.1f}", f"{whole * 1000:.0f}", "", "1.000x"],
    ]
