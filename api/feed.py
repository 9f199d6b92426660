"""A session's events after a seq, from the log and then live, exactly once.

The caller subscribes first (`EventHub.subscribe`), then reads the log: that
closes the window in which an event could be published between the two. Each
live event is checked against the last seq delivered (`Cursor`): older ones are
dropped (already replayed), and a jump ahead is filled from the log before the
event itself goes out.

Every refill (the first replay, a resync after an overflow or a lost
connection, the keepalive check, a gap on the live path) goes through
`Cursor.refill`, which reads the log a page at a time, bounded in events and in
bytes, and hands each page on before reading the next: a replay's memory does
not grow with the log. It is also the one place that notices when what the
cursor needs was trimmed from the log, and says so (`Truncated`), so no path
can skip events silently.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from redis.asyncio import Redis

from api.hub import LiveEvent, live_event
from shared import eventlog

# A page of the log: at most PAGE_EVENTS events, and about PAGE_BYTES. Events
# differ in size a thousandfold (a text delta, a tool's whole output), so the
# first page is small and each next one is sized by the last one's events.
PAGE_EVENTS = 500
PAGE_BYTES = 1 << 20
FIRST_PAGE_EVENTS = 16


class Truncated(msgspec.Struct, frozen=True):
    """Events after `after` and before `first_seq` are no longer in the log."""

    after: int
    first_seq: int


class Cursor:
    """Where a reader of a session's events is: the last seq it was given."""

    def __init__(self, redis: Redis, sid: str, after: int) -> None:
        self._redis = redis
        self._sid = sid
        self.last = after
        self.latest = after  # the session's latest seq as the last refill read it

    async def refill(self) -> AsyncIterator[LiveEvent | Truncated]:
        """The logged events after the cursor, oldest first, a page at a time;
        first a `Truncated` wherever the next one the cursor needs is gone. The
        cursor moves past each item as it is yielded."""
        # The latest seq is read before the log: were it read after, events
        # appended in between would look trimmed away.
        latest = self.latest = await eventlog.latest_seq(self._redis, self._sid)
        count = FIRST_PAGE_EVENTS
        while True:
            page = await eventlog.read_after(self._redis, self._sid, self.last, count)
            # The log is contiguous (appended in seq order, trimmed from the
            # front): if the next seq is not first in the page, it was trimmed.
            first = page[0].seq if page else latest + 1
            if first > self.last + 1:
                truncated = Truncated(after=self.last, first_seq=first)
                self.last = first - 1
                yield truncated
            size = 0
            for event in page:
                self.last = event.seq
                size += len(event.data)
                yield live_event(event.seq, event.type, event.data)
            if len(page) < count:
                return
            count = max(1, min(PAGE_EVENTS, PAGE_BYTES * len(page) // max(size, 1)))
