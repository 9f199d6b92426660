"""Soak: 100 sessions x 4 turns over 2 API and 2 worker processes, one worker killed
and restarted midway. Every accepted message gets exactly one terminal event, every
client's seq is gapless, no session is left running."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
from conftest import ALPHA_KEY, Stack
from httpx_sse import aconnect_sse

SESSIONS = 100
TURNS = 4
HEADERS = {"Authorization": f"Bearer {ALPHA_KEY}"}


async def _client_session(
    bases: list[str], index: int, accepted: dict[str, list[str]], seen: dict[str, list[Any]]
) -> None:
    send_base = bases[index % 2]
    stream_base = bases[(index + 1) % 2]
    # Bounds, not expectations: on a loaded 2-core machine a send may queue long.
    async with httpx.AsyncClient(base_url=send_base + "/api/v1", headers=HEADERS, timeout=150) as c:
        sandbox = (await c.post("/sandboxes", json={})).json()["id"]
        sid = (await c.post(f"/sandboxes/{sandbox}/sessions", json={})).json()["id"]
        accepted[sid] = []
        seen[sid] = []
        opened = asyncio.Event()

        async def follow() -> None:
            async with (
                httpx.AsyncClient(
                    base_url=stream_base + "/api/v1", headers=HEADERS, timeout=150
                ) as s,
                aconnect_sse(s, "GET", f"/sessions/{sid}/stream", params={"after": "0"}) as source,
            ):
                opened.set()
                async for sse in source.aiter_sse():
                    if not sse.data or sse.event == "keepalive":
                        continue
                    seen[sid].append(json.loads(sse.data))
                    if (
                        sum(e["type"] in {"session_completed", "session_failed"} for e in seen[sid])
                        >= TURNS
                    ):
                        return

        reader = asyncio.create_task(follow())
        await opened.wait()
        for turn in range(TURNS):
            text = "run: sleep 1; echo slow" if (index + turn) % 2 == 0 else f"hello {turn}"
            reply = await c.post(
                f"/sessions/{sid}/messages",
                json={"role": "user", "content": [{"type": "text", "text": text}]},
            )
            assert reply.status_code in (200, 502), reply.text
            accepted[sid].append(reply.json()["turn_id"])
        await asyncio.wait_for(reader, 150)


def test_soak_with_a_worker_killed_midway(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(
        workers=2, lease_seconds="3", lease_grace_seconds="1", reaper_interval_seconds="1"
    )
    bases = [stack.base_url, stack.start_api()]
    accepted: dict[str, list[str]] = {}
    seen: dict[str, list[Any]] = {}

    async def soak() -> dict[str, float]:
        started = time.monotonic()
        clients = [
            asyncio.create_task(_client_session(bases, i, accepted, seen)) for i in range(SESSIONS)
        ]
        while sum(len(v) for v in accepted.values()) < SESSIONS * TURNS // 3:
            await asyncio.sleep(0.05)
        killed_at = time.time()
        stack.workers[0].stop(signal.SIGKILL)
        stack.workers[0] = stack.start_worker()
        await asyncio.gather(*clients)
        return {"seconds": time.monotonic() - started, "killed_at": killed_at}

    figures = asyncio.run(soak())

    lost_at: list[float] = []
    for sid, events in seen.items():
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1)), f"gap in {sid}: {seqs}"
        terminals = [e for e in events if e["type"] in {"session_completed", "session_failed"}]
        assert [t["turn_id"] for t in terminals] == accepted[sid]
        lost_at += [
            datetime.fromisoformat(t["created_at"].replace("Z", "+00:00")).timestamp()
            for t in terminals
            if t["stop_reason"] == "worker_lost"
        ]
    with httpx.Client(base_url=bases[0] + "/api/v1", headers=HEADERS) as client:
        running = [
            s
            for s in client.get("/sandboxes", params={"limit": "200"}).json()
            for s in client.get(f"/sandboxes/{s['id']}/sessions").json()
            if s["state"] != "active"
        ]
    assert running == []
    turns = sum(len(v) for v in accepted.values())
    assert turns == SESSIONS * TURNS
    assert lost_at, "the kill should catch turns in flight"
    detection = [at - figures["killed_at"] for at in lost_at]
    # A lease stands still for lease + grace + a third of the lease (5 s) before
    # a reaper ends the turn; + a reaper interval + slack.
    assert max(detection) < 5 + 1 + 2
    print(
        f"\nsoak: {turns} turns in {figures['seconds']:.1f} s "
        f"({turns / figures['seconds']:.0f} turns/s); {len(lost_at)} ended worker_lost, "
        f"detected {min(detection):.1f}-{max(detection):.1f} s after the kill "
        "(lease 3 s, grace 1 s, reaper every 1 s)"
    )
