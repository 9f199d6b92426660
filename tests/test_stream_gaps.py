"""No silent gap: every path that refills a stream from the log says when what it
needs was trimmed (`log_truncated`), and a replay reads the log a page at a time.

These drive the stream's own generator (`api.stream.session_events`) in this
process against a real Redis and a real `EventHub`, so that trims, overflows and
reconnects can be interleaved at will; the events are appended by the store's
own append script, as a worker appends them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.feed import PAGE_EVENTS, Cursor
from api.hub import EventHub, LiveEvent
from api.stream import session_events
from shared import keys
from shared.events import ToolResult
from shared.models import now_rfc3339
from shared.queue import connect
from shared.store import SessionStore

SANDBOX = str(uuid.uuid4())


def _event(sid: str, turn_id: str, size: int) -> ToolResult:
    return ToolResult(
        session_id=sid,
        sandbox_id=SANDBOX,
        turn_id=turn_id,
        message_id="m",
        created_at=now_rfc3339(),
        index=0,
        tool_use_id="t",
        content="x" * size,
        is_error=False,
    )


def _parse(chunk: bytes) -> list[tuple[str, int | None, dict[str, Any]]]:
    """(event, id, data) of each frame in a chunk of the stream's body."""
    frames = []
    for block in chunk.split(b"\n\n"):
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            fields.setdefault(name, value)
        if "data" in fields:
            seq = int(fields["id"]) if "id" in fields else None
            frames.append((fields["event"], seq, json.loads(fields["data"])))
    return frames


class Client:
    """One stream's reader: checks each frame against what it saw before."""

    def __init__(self, redis_client: Any, hub: EventHub, sid: str) -> None:
        self._redis = redis_client
        self._hub = hub
        self.sid = sid
        self.last = 0
        self.truncations = 0
        self._stream: AsyncIterator[bytes] | None = None

    def open(self) -> None:
        self._stream = session_events(self._redis, self._hub, self.sid, SANDBOX, self.last)

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]
            self._stream = None

    async def read(self, chunks: int, latest: int) -> None:
        """Up to `chunks` writes of the stream, fewer once it has given `latest`."""
        assert self._stream is not None
        for _ in range(chunks):
            if self.last >= latest:
                return
            chunk = await asyncio.wait_for(self._stream.__anext__(), 5)
            for event, seq, data in _parse(chunk):
                assert data.get("session_id", self.sid) == self.sid  # its session's only
                if event == "log_truncated":
                    # A gap is announced where it starts.
                    assert data["after"] == self.last, (data, self.last)
                    assert data["first_seq"] > self.last + 1
                    self.last = data["first_seq"] - 1
                    self.truncations += 1
                elif event == "keepalive":
                    assert seq is None
                else:
                    assert seq == self.last + 1, f"gap: {self.last} -> {seq}"
                    assert data["seq"] == seq
                    self.last = seq


async def _setup(url: str, buffer_bytes: int) -> tuple[Any, EventHub, SessionStore, str, str]:
    client = await connect(url)
    hub = EventHub(await connect(url), tick_seconds=0.05, client_buffer_bytes=buffer_bytes)
    await hub.start()
    store = SessionStore(client, log_max_events=100_000, log_ttl_seconds=600)
    sid, turn_id = str(uuid.uuid4()), str(uuid.uuid4())
    await client.hset(keys.session(sid), "turn_id", turn_id)
    return client, hub, store, sid, turn_id


Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("trim"), st.integers(0, 30)),
        st.tuples(st.just("read"), st.integers(1, 5)),
        st.tuples(st.just("reconnect"), st.just(0)),
        st.tuples(st.just("tick"), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=steps)
def test_a_stream_is_gapless_or_announces_the_gap(redis_url: str, steps: list[Step]) -> None:
    """Random interleavings of appends, trims of the log, a reader that reads a
    little or nothing (its 2 KB buffer overflows: a resync), reconnects from the
    last id seen, and keepalive ticks: the reader's view never skips a seq
    unless a `log_truncated` says where and how far, and it ends at the latest."""

    at = "set-up"  # the step an example that stands still stands at
    readers: list[Client] = []

    async def run() -> None:
        nonlocal at
        client, hub, store, sid, turn_id = await _setup(redis_url, buffer_bytes=2048)
        reader = Client(client, hub, sid)
        readers.append(reader)
        latest = 0
        try:
            reader.open()
            for index, (kind, n) in enumerate(steps):
                at = f"step {index}"
                if kind == "append":
                    seqs = await store.append_events(
                        sid, turn_id, [_event(sid, turn_id, 200) for _ in range(n)]
                    )
                    latest = seqs[-1]
                elif kind == "trim":
                    await client.xtrim(keys.log(sid), maxlen=n, approximate=False)
                elif kind == "read":
                    await reader.read(n, latest)
                elif kind == "reconnect":
                    await reader.close()
                    reader.open()
                elif kind == "tick":
                    await asyncio.sleep(0.06)
            at = f"the last read, to {latest}"
            await reader.read(10_000, latest)
            assert reader.last == latest
        finally:
            at = "the stream's close"
            await reader.close()
            at = "the hub's stop"
            await hub.stop()
            at = "the clean-up"
            await client.delete(keys.session(sid), keys.log(sid), keys.seq(sid))
            await client.aclose()

    # An example takes a few tenths of a second; one that stands still fails
    # with where it stood rather than at the suite's time limit.
    try:
        asyncio.run(asyncio.wait_for(run(), 60))
    except TimeoutError:
        last = readers[0].last if readers else None
        raise AssertionError(f"the example stood still at {at}, its reader at {last}") from None


def test_a_stream_keeps_its_own_events_whole_while_the_live_channel_floods(
    redis_url: str,
) -> None:
    """All sessions' live events share one channel, so an API process following
    one session hears every other session's too. While two other writers flood
    the channel with lines of another session, the stream still gets each of its
    own events once, in order, none announced lost, and nothing else."""
    stop = threading.Event()
    published = [0, 0]

    def flood(slot: int) -> None:
        other = str(uuid.uuid4())
        # (far ahead of the stream's seqs: a line routed to it would not pass as old)
        line = b'{"seq":1000000,' + msgspec.json.encode(_event(other, "t", 50))[1:]
        payload = b"\n".join([line] * 50)
        writer = redis.Redis.from_url(redis_url)
        try:
            while not stop.is_set() and published[slot] < 200_000:
                writer.publish(keys.LIVE_CHANNEL, payload)
                published[slot] += 1
        finally:
            writer.close()

    async def run() -> None:
        client, hub, store, sid, turn_id = await _setup(redis_url, buffer_bytes=1 << 20)
        reader = Client(client, hub, sid)
        try:
            reader.open()
            await reader.read(1, 1)  # the stream's opening: subscribed
            floods = [threading.Thread(target=flood, args=(n,)) for n in range(2)]
            for thread in floods:
                thread.start()
            latest = 0
            for _ in range(20):
                seqs = await store.append_events(
                    sid, turn_id, [_event(sid, turn_id, 100) for _ in range(10)]
                )
                latest = seqs[-1]
                await reader.read(5, latest)
            await reader.read(10_000, latest)
            stop.set()
            for thread in floods:
                thread.join(10)
            assert (reader.last, reader.truncations) == (latest, 0)
            assert min(published) > 0  # the channel was flooded meanwhile
        finally:
            stop.set()
            await reader.close()
            await hub.stop()
            await client.delete(keys.session(sid), keys.log(sid), keys.seq(sid))
            await client.aclose()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_a_resync_after_an_overflow_announces_what_was_trimmed(redis_url: str) -> None:
    """The reported case: a client that stops reading overflows its buffer, the
    log is trimmed meanwhile, and the refill after the resync must say so
    (before: ids jumped ahead with no `log_truncated`)."""

    async def run() -> None:
        client, hub, store, sid, turn_id = await _setup(redis_url, buffer_bytes=4096)
        reader = Client(client, hub, sid)
        try:
            reader.open()
            seqs = await store.append_events(sid, turn_id, [_event(sid, turn_id, 100)])
            await reader.read(10, seqs[-1])  # the stream is open and live
            for _ in range(10):  # 10 x 10 KB while it does not read: an overflow
                seqs = await store.append_events(
                    sid, turn_id, [_event(sid, turn_id, 1000) for _ in range(10)]
                )
            await client.xtrim(keys.log(sid), maxlen=20, approximate=False)
            await reader.read(10_000, seqs[-1])
            assert reader.last == seqs[-1] == 101
            assert reader.truncations == 1
        finally:
            await reader.close()
            await hub.stop()
            await client.aclose()

    asyncio.run(run())


def test_a_replay_sends_its_first_event_before_reading_a_second_page(redis_url: str) -> None:
    """A replay reads the log as it goes: when its first event is handed on, one
    page has been read (counted by Redis itself), however long the log."""

    async def run() -> None:
        client, hub, store, sid, turn_id = await _setup(redis_url, buffer_bytes=1 << 20)
        try:
            for _ in range(5):
                await store.append_events(
                    sid, turn_id, [_event(sid, turn_id, 10) for _ in range(PAGE_EVENTS)]
                )
            stats = redis.Redis.from_url(redis_url)
            before = stats.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0)
            cursor = Cursor(client, sid, 0)
            pages = cursor.refill()
            first = await pages.__anext__()
            after_first = stats.info("commandstats")["cmdstat_xrange"]["calls"]
            assert isinstance(first, LiveEvent) and first.seq == 1
            assert after_first - before == 1
            rest = [item async for item in pages]
            assert len(rest) == 5 * PAGE_EVENTS - 1
            stats.close()
        finally:
            await hub.stop()
            await client.aclose()

    asyncio.run(run())


def test_a_page_of_large_events_is_bounded_in_bytes(redis_url: str) -> None:
    """After a page of large events the next page asks for fewer: a page holds
    about a megabyte, not PAGE_EVENTS times the largest event."""

    async def run() -> None:
        client, hub, store, sid, turn_id = await _setup(redis_url, buffer_bytes=1 << 20)
        try:
            for _ in range(20):
                await store.append_events(
                    sid, turn_id, [_event(sid, turn_id, 64 * 1024) for _ in range(50)]
                )
            stats = redis.Redis.from_url(redis_url)
            before = stats.info("commandstats")["cmdstat_xrange"]["calls"]
            count = 0
            async for _ in Cursor(client, sid, 0).refill():
                count += 1
            calls = stats.info("commandstats")["cmdstat_xrange"]["calls"] - before
            stats.close()
            assert count == 1000
            # 64 MB in pages of ~1 MB: about 64 reads, not 2.
            assert calls >= 50, calls
        finally:
            await hub.stop()
            await client.aclose()

    asyncio.run(run())
