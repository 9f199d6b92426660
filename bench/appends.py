"""The append path alone: what Redis and the writer pay per event.

N turns, each with one text delta per round (as when every turn's model sends a
chunk between two of the writer's calls), appended by the append script while
one connection subscribes to the sessions' live channel, as an API process does.
Ours: one call per round for all N turns (`EventWriter`); baseline in the same
run: one call per turn per round (how each turn wrote its own events before).
Reported per event: Redis CPU (INFO, before and after), Redis commands, and
the writing process's CPU. Unlike the streaming benchmark, the offered load
is fixed, so the figures do not move with how far a loaded machine lags.
Sessions share the live channel, so every API process that streams any session
hears all of their events: one row has 8 listeners, pairs of rows compare
appending a call of N turns' deltas by the append script and by a transaction
of plain commands (for N from 2 to 64), two what packing
the writer's call costs, the next what Redis spends on a turn's end (its reply
a hundred chunks long, the end script's arguments as long), the next two what
a kilobyte costs Redis as a script's argument against a plain command's (why the
scripts take each text once and copy it as little as they can), and the last
two what an API process's hub spends on a line of a session it does not stream.
"""

from __future__ import annotations

import asyncio
import os
import time

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection

from api.hub import EventHub
from bench.harness import assistant_message, user_message
from shared import events as ev
from shared import keys
from shared.metrics import TurnFigures
from shared.models import new_id, now_rfc3339
from shared.queue import connect
from shared.settings import Settings
from shared.store import SessionStore, TurnAppend
from shared.turns import TurnIds, completed


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


async def _measure(
    redis_url: str,
    count: int,
    rounds: int,
    batched: bool,
    listeners: int = 1,
    watched_min_events: int | None = None,
) -> list[str]:
    """`listeners`: connections subscribed to the live channel, as that many API
    processes streaming sessions would be; `watched_min_events`: the store's
    (`TurnLifecycle.watched_min_events`), when not its default."""
    redis = Redis.from_url(redis_url)
    listener = Redis.from_url(redis_url)
    store = SessionStore(redis)
    if watched_min_events is not None:
        store.watched_min_events = watched_min_events
    sandbox_id, turns = await _turns(store, count)
    pubsubs = [listener.pubsub() for _ in range(listeners)]
    for pubsub in pubsubs:
        await pubsub.subscribe(keys.LIVE_CHANNEL)
    received = 0

    async def listen(pubsub: PubSub) -> None:
        nonlocal received
        async for message in pubsub.listen():
            if message["type"] == "message":  # events of the call's sessions, one a line
                received += message["data"].count(b"\n") + 1

    readers = [asyncio.create_task(listen(pubsub)) for pubsub in pubsubs]
    cpu_before, commands_before = await _counters(redis)
    ours_before = time.process_time()
    last: dict[str, int | None] = {sid: None for sid, _ in turns}
    for n in range(rounds):
        # As the worker's writer sends them: each turn counts its events in the
        # log, so that a call sent again appends nothing twice, and after its
        # first append sends them with their seqs.
        batch = [
            TurnAppend(sid, turn, [_delta(sid, sandbox_id, turn, n)], n == 0, n, last_seq=last[sid])
            for sid, turn in turns
        ]
        if batched:
            firsts = await store.append_batch(batch)
        else:
            firsts = [(await store.append_batch([one]))[0] for one in batch]
        for (sid, _), first in zip(turns, firsts, strict=True):
            last[sid] = first  # one event a round: the first is the last
    cpu_after, commands_after = await _counters(redis)
    # The listener's share counts too: the last rounds' events may still be on
    # their way to it when the writer's last call returns.
    while received < count * rounds * listeners:
        await asyncio.sleep(0.01)
    ours = time.process_time() - ours_before
    for reader in readers:
        reader.cancel()
    for pubsub in pubsubs:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    await listener.aclose()
    await redis.aclose()
    events = count * rounds
    return [
        f"{(cpu_after - cpu_before) / events * 1e6:.1f}",
        f"{(commands_after - commands_before - 2) / events:.2f}",  # less the INFO calls
        f"{ours / events * 1e6:.1f}",
    ]


async def _finish_us(redis_url: str, count: int, chunks: int) -> list[str]:
    """Redis CPU and commands to end each of `count` turns whose reply is `chunks`
    text deltas long: the reply is stored and goes out twice more, in
    text_complete and in the terminal event, all in the script that ends the turn."""
    redis = Redis.from_url(redis_url)
    store = SessionStore(redis)
    sandbox_id, turns = await _turns(store, count)
    text = "".join(f"{n}@{time.time():.6f} " for n in range(chunks))
    ends = []
    for sid, turn in turns:
        ids = TurnIds(session_id=sid, sandbox_id=sandbox_id, turn_id=turn, message_id=new_id())
        message = assistant_message(ids, text)
        rest = [ev.TextComplete(**ids.stamped(), index=0, text=text)]
        usage = ev.Usage(input_tokens=9, output_tokens=chunks)
        terminal = completed(ids, message, "end_turn", usage)
        ends.append((sid, turn, message, terminal, rest))
    figures = TurnFigures(events=chunks + 1, duration_seconds=2.0, first_token_seconds=0.01)
    cpu_before, commands_before = await _counters(redis)
    for sid, turn, message, terminal, rest in ends:
        # As an interrupt of a queued turn ends it: the same script, no lease to hold.
        if not await store.finish_turn(sid, turn, "unstarted", message, terminal, figures, rest):
            raise RuntimeError(f"turn {turn} did not end")
    cpu_after, commands_after = await _counters(redis)
    await redis.aclose()
    return [
        f"{(cpu_after - cpu_before) / count * 1e6:.1f}",
        f"{(commands_after - commands_before - 2) / count:.2f}",  # less the INFO calls
        "-",
    ]


async def _argument_us(redis_url: str, size: int, count: int) -> tuple[float, float]:
    """Redis CPU a KiB of argument costs: `count` pipelined calls of a script that
    does nothing with one distinct `size`-byte argument, and, as the baseline,
    as many SETs of the same values. Lua hashes every byte of every string a
    script receives or makes."""
    redis = Redis.from_url(redis_url)
    values = [os.urandom(size // 2).hex() for _ in range(count)]
    sha = await redis.script_load("return 1")
    figures = []
    for script in (True, False):
        cpu_before, _ = await _counters(redis)
        async with redis.pipeline(transaction=False) as pipe:
            for value in values:
                if script:
                    pipe.evalsha(sha, 0, value)
                else:
                    pipe.set("bench:argument", value)
            await pipe.execute()
        cpu_after, _ = await _counters(redis)
        figures.append((cpu_after - cpu_before) / count / (size / 1024) * 1e6)
    await redis.delete("bench:argument")
    await redis.aclose()
    return figures[0], figures[1]


def _skipped_us(line: bytes, repeat: int) -> float:
    """What an API process's hub spends on a line of a session it does not
    stream (the live channel is shared): µs a line, over `repeat` messages."""
    hub = EventHub(Redis())  # never started: only its routing of a message runs
    reply: list[bytes | int] = [b"message", b"ss:live:0", line]
    started = time.perf_counter()
    for _ in range(repeat):
        hub._dispatch(reply)
    return (time.perf_counter() - started) / repeat * 1e6


async def _packing_us(redis_url: str, count: int, repeat: int) -> tuple[float, float]:
    """µs an event to pack the writer's call for `count` turns of one delta each
    (with their seqs, as after a turn's first append): by the connections of
    sandstream's processes (`shared.queue.connect`) and by redis-py's own."""
    redis = await connect(redis_url)
    try:
        store = SessionStore(redis)
        sandbox_id, turn_id = new_id(), new_id()
        batch = [
            TurnAppend(sid, turn_id, [_delta(sid, sandbox_id, turn_id, 1)], False, 1, last_seq=1)
            for sid in (new_id() for _ in range(count))
        ]
        script_keys, args = store.append_call(batch)
        command = ("EVALSHA", "0" * 40, len(script_keys), *script_keys, *args)
        figures = []
        for connection in (redis.connection_pool.make_connection(), Connection()):
            started = time.perf_counter()
            for _ in range(repeat):
                connection.pack_command(*command)
            figures.append((time.perf_counter() - started) / repeat / count * 1e6)
        return figures[0], figures[1]
    finally:
        await redis.aclose()


def _tool_result_line(size: int) -> bytes:
    sid = new_id()
    result = ev.ToolResult(
        session_id=sid,
        sandbox_id=new_id(),
        turn_id=new_id(),
        message_id=new_id(),
        created_at=now_rfc3339(),
        index=0,
        tool_use_id="toolu_skip",
        content="x" * size,
        is_error=False,
    )
    return b'{"seq":1,' + msgspec.json.encode(result)[1:]


HEADER = ["", "Redis µs/event", "Redis cmds/event", "client µs/event (writer and listeners)"]

# Turns (one delta each) a call carries, in the rows comparing the script's way
# of appending events with their seqs to the transaction's.
BY_WAY_TURNS = (2, 8, 16, 64)


def _by_way(redis_url: str) -> list[list[str]]:
    """A call of N turns' deltas with their seqs, by the append script and by a
    transaction of plain commands: what sets `shared.turns.WATCHED_MIN_EVENTS`."""
    rows = []
    for n in BY_WAY_TURNS:
        rounds = max(40, 4000 // n)
        for way, least in (("the script", 1 << 30), ("a transaction", 0)):
            figures = asyncio.run(_measure(redis_url, n, rounds, True, watched_min_events=least))
            rows.append([f"a call of {n} turns' deltas, by {way}", *figures])
    return rows


def bench_appends(redis_url: str, count: int, rounds: int) -> list[list[str]]:
    sid = new_id()
    delta = _delta(sid, new_id(), new_id(), 0)
    delta_line = b'{"seq":1,' + msgspec.json.encode(delta)[1:]
    ours, theirs = asyncio.run(_packing_us(redis_url, count, 200))
    in_script, in_set = asyncio.run(_argument_us(redis_url, 4096, count * 10))
    return [
        [f"one call for {count} turns", *asyncio.run(_measure(redis_url, count, rounds, True))],
        [
            "the same, 8 listeners (API processes) on the live channel",
            *asyncio.run(_measure(redis_url, count, rounds, True, listeners=8)),
        ],
        ["baseline: one call per turn", *asyncio.run(_measure(redis_url, count, rounds, False))],
        *_by_way(redis_url),
        ["packing the writer's call for them (sandstream's connections)", "-", "-", f"{ours:.2f}"],
        ["baseline: the same call packed by redis-py's connection", "-", "-", f"{theirs:.2f}"],
        [
            f"a turn's end, its reply 100 chunks of text: per end, over {count}",
            *asyncio.run(_finish_us(redis_url, count, 100)),
        ],
        ["a 4 KiB argument of a script, Redis µs per KiB", f"{in_script:.2f}", "-", "-"],
        ["baseline: the same values SET, Redis µs per KiB", f"{in_set:.2f}", "-", "-"],
        [
            "an API process skipping another session's text delta",
            "-",
            "-",
            f"{_skipped_us(delta_line, 20_000):.2f}",
        ],
        [
            "the same, a 64 KiB tool result",
            "-",
            "-",
            f"{_skipped_us(_tool_result_line(64 * 1024), 2_000):.2f}",
        ],
    ]
