"""feed(): a session's events after a seq, from the log and then live, exactly once.

The caller subscribes first (`EventHub.subscribe`), then reads the log: that
closes the window in which an event could be published between the two. Each
live event is checked against the last seq delivered: older ones are dropped
(already replayed), and a jump ahead is filled from the log before the event
itself goes out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
from redis.asyncio import Redis

from api.hub import DRAIN, TICK, EventHub, LiveEvent, QueueItem, live_event
from shared import eventlog


class Truncated(msgspec.Struct, frozen=True):
    """The client asked for events older than the retained log."""

    after: int
    first_seq: int


class Tick(msgspec.Struct, frozen=True):
    """The keepalive interval passed (the hub's timer)."""


class Draining(msgspec.Struct, frozen=True):
    """This API process is shutting down; the client should reconnect elsewhere."""


FeedItem = LiveEvent | Truncated | Tick | Draining


async def feed(
    redis: Redis,
    hub: EventHub,
    sid: str,
    queue: asyncio.Queue[QueueItem],
    after: int,
    *,
    check_retained: bool = True,
    replay: bool = True,
) -> AsyncIterator[FeedItem]:
    """The events after `after` on a subscribed queue. `replay=False` when the
    subscription is known to predate every event after `after`."""
    if hub.draining:
        yield Draining()
        return
    if check_retained:
        # The latest seq is read before the log: were it read after, events
        # appended in between would look trimmed away.
        latest = await eventlog.latest_seq(redis, sid)
        first = await eventlog.first_seq(redis, sid)
        if first is None:  # an empty log: expired, or nothing yet
            first = latest + 1
        if first > after + 1:
            yield Truncated(after=after, first_seq=first)
            after = first - 1
    last = after

    async def backfill() -> AsyncIterator[LiveEvent]:
        nonlocal last
        while True:
            batch = await eventlog.read_after(redis, sid, last)
            for event in batch:
                last = event.seq
                yield live_event(event.seq, event.type, event.data)
            if len(batch) < 1000:
                return

    if replay:
        async for event in backfill():
            yield event
    while True:
        item = await queue.get()
        if isinstance(item, LiveEvent):
            if item.seq <= last:
                continue
            if item.seq == last + 1:
                last = item.seq
                yield item
                continue
            # A gap: what is missing (and this one) comes from the log.
        elif item == TICK:
            # Quiet for a while: check the log too, so that even a lost
            # last message (nothing after it to reveal the gap) turns up.
            async for event in backfill():
                yield event
            yield Tick()
            continue
        elif item == DRAIN:
            yield Draining()
            return
        async for event in backfill():
            yield event
