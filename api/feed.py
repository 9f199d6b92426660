"""A session's events after a seq, from the log and then live, exactly once.

The caller subscribes first (`EventHub.subscribe`), then reads the log: that
closes the window in which an event could be published between the two. Each
live event is checked against the last seq delivered (`Cursor`): older ones are
dropped (already replayed), and a jump ahead is filled from the log before the
event itself goes out.

`feed()` yields the events as items, for the API's waits on a turn; the SSE
stream runs the same loop on its own (`api.stream`), so that each event passes
through one generator per stream rather than two.
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


class Cursor:
    """Where a reader of a session's events is: the last seq it was given."""

    def __init__(self, redis: Redis, sid: str, after: int) -> None:
        self._redis = redis
        self._sid = sid
        self.last = after

    async def check_retained(self) -> Truncated | None:
        """Whether events after the cursor were trimmed from the log; if so, the
        cursor moves to the first retained one."""
        # The latest seq is read before the log: were it read after, events
        # appended in between would look trimmed away.
        latest = await eventlog.latest_seq(self._redis, self._sid)
        first = await eventlog.first_seq(self._redis, self._sid)
        if first is None:  # an empty log: expired, or nothing yet
            first = latest + 1
        if first <= self.last + 1:
            return None
        truncated = Truncated(after=self.last, first_seq=first)
        self.last = first - 1
        return truncated

    async def backfill(self) -> list[LiveEvent]:
        """Every logged event after the cursor, which moves past them."""
        events: list[LiveEvent] = []
        while True:
            batch = await eventlog.read_after(self._redis, self._sid, self.last)
            for event in batch:
                self.last = event.seq
                events.append(live_event(event.seq, event.type, event.data))
            if len(batch) < 1000:
                return events


async def feed(
    redis: Redis,
    hub: EventHub,
    sid: str,
    queue: asyncio.Queue[QueueItem],
    after: int,
) -> AsyncIterator[LiveEvent | Tick | Draining]:
    """The events after `after` on a subscribed queue: the logged ones first,
    then live. (A wait on a turn needs no retention check: it starts from a
    seq it read itself moments before.)"""
    if hub.draining:
        yield Draining()
        return
    cursor = Cursor(redis, sid, after)
    for event in await cursor.backfill():
        yield event
    while True:
        item = await queue.get()
        if isinstance(item, LiveEvent):
            if item.seq == cursor.last + 1:
                cursor.last = item.seq
                yield item
                continue
            if item.seq <= cursor.last:
                continue
            # A gap: what is missing (and this one) comes from the log.
        elif item == TICK:
            # Quiet for a while: check the log too, so that even a lost
            # last message (nothing after it to reveal the gap) turns up.
            for event in await cursor.backfill():
                yield event
            yield Tick()
            continue
        elif item == DRAIN:
            yield Draining()
            return
        for event in await cursor.backfill():
            yield event
