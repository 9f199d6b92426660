"""Reading a session's event log (a Redis Stream whose entry ids are `<seq>-0`).

Writes happen only in the Lua scripts (`SessionStore.append_events`,
`SessionStore.finish_turn`), which assign the seq.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from shared import keys


class LoggedEvent(msgspec.Struct, frozen=True):
    seq: int
    type: str
    data: bytes


async def read_after(redis: Redis, sid: str, after: int, count: int = 1000) -> list[LoggedEvent]:
    """Events with seq > after, oldest first, at most `count`."""
    entries = await redis.xrange(keys.log(sid), min=f"({after}-0", max="+", count=count)
    return [
        LoggedEvent(int(entry_id.split(b"-", 1)[0]), fields[b"t"].decode(), fields[b"d"])
        for entry_id, fields in entries
    ]


async def first_seq(redis: Redis, sid: str) -> int | None:
    """The oldest seq still retained, or None when the log is empty."""
    entries = await redis.xrange(keys.log(sid), count=1)
    return int(entries[0][0].split(b"-", 1)[0]) if entries else None


async def latest_seq(redis: Redis, sid: str) -> int:
    return int(await redis.get(keys.seq(sid)) or 0)
