"""The append path alone: what Redis and the writer pay per event.

N turns, each with one text delta per round (as when every turn's model sends a
chunk between two of the writer's calls), appended by the append script while
one connection subscribes to every session's live channel, as an API process does.
Ours: one call per round for all N turns (`EventWriter`); baseline in the same
run: one call per turn per round (how each turn wrote its own events before).
Reported per event: Redis CPU (INFO, before and after), Redis commands, and
the writing process's CPU. Unlike the streaming benchmark, the offered load
is fixed, so the figures do not move with how far a loaded machine lags.
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from bench.harness import user_message
from shared import events as ev
from shared import keys
from shared.models import new_id, now_rfc3339
from shared.settings import Settings
from shared.store import SessionStore, TurnAppend


async def _counters(redis: Redis) -> tuple[float, int]:
    cpu = await redis.info("cpu")
    stats = await redis.info("stats")
    used = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return used, int(stats["total_commands_processed"])


async def _turns(store: SessionStore, count: int) -> tuple[str, list[tuple[str, str]]]:
    sandbox = await store.create_sandbox("bench", {})
    agent = Settings().default_agent()
    turns = []
    for _ in range(count):
        sid = (await store.create_session("bench", sandbox.id, {}, agent)).id
        turn = new_id()
        await store.claim_turn(sid, "bench", turn, user_message(sid, turn, "hi"))
        turns.append((sid, turn))
    return sandbox.id, turns


def _delta(sid: str, sandbox_id: str, turn: str, n: int) -> ev.TextDelta:
    return ev.TextDelta(
        session_id=sid,
        sandbox_id=sandbox_id,
        turn_id=turn,
        message_id=turn,
        created_at=now_rfc3339(),
        index=0,
        text=f"{n}@{time.time():.6f} ",
    )


async def _measure(redis_url: str, count: int, rounds: int, batched: bool) -> list[str]:
    redis = Redis.from_url(redis_url)
    listener = Redis.from_url(redis_url)
    store = SessionStore(redis)
    sandbox_id, turns = await _turns(store, count)
    pubsub = listener.pubsub()
    await pubsub.subscribe(*{keys.events_channel(sid) for sid, _ in turns})
    received = 0

    async def listen() -> None:
        nonlocal received
        async for message in pubsub.listen():
            if message["type"] == "message":  # events of a channel's sessions, one a line
                received += message["data"].count(b"\n") + 1

    reader = asyncio.create_task(listen())
    cpu_before, commands_before = await _counters(redis)
    ours_before = time.process_time()
    for n in range(rounds):
        # As the worker's writer sends them: each turn counts its events in the
        # log, so that a call sent again appends nothing twice.
        batch = [
            TurnAppend(sid, turn, [_delta(sid, sandbox_id, turn, n)], n == 0, appended_before=n)
            for sid, turn in turns
        ]
        if batched:
            await store.append_batch(batch)
        else:
            for one in batch:
                await store.append_batch([one])
    cpu_after, commands_after = await _counters(redis)
    # The listener's share counts too: the last rounds' events may still be on
    # their way to it when the writer's last call returns.
    while received < count * rounds:
        await asyncio.sleep(0.01)
    ours = time.process_time() - ours_before
    reader.cancel()
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await listener.aclose()
    await redis.aclose()
    events = count * rounds
    return [
        f"{(cpu_after - cpu_before) / events * 1e6:.1f}",
        f"{(commands_after - commands_before - 2) / events:.2f}",  # less the INFO calls
        f"{ours / events * 1e6:.1f}",
    ]


HEADER = ["", "Redis µs/event", "Redis cmds/event", "client µs/event (writer and listener)"]


def bench_appends(redis_url: str, count: int, rounds: int) -> list[list[str]]:
    return [
        [f"one call for {count} turns", *asyncio.run(_measure(redis_url, count, rounds, True))],
        ["baseline: one call per turn", *asyncio.run(_measure(redis_url, count, rounds, False))],
    ]
