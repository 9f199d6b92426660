"""EventHub: one pub/sub connection per API process, fanned out to its clients.

A connection per SSE client would tie Redis's connection count to the number of
open browsers. Instead each process subscribes to the live channel
(`keys.LIVE_CHANNEL`, shared by all sessions) when the first local client of
a session arrives and unsubscribes when the last one leaves; each event
goes to the clients of the session it names, copied into each client's queue,
bounded in bytes (not events: one tool
result may be a thousand times a text delta). A client too slow to keep up, or
a lost connection, gets a RESYNC marker and refills from the session log, so
live delivery may be lossy but what a client sees never is.

The hub also routes what ends a wait: a turn's terminal event (on this
process's reply channel, or on a session channel it is subscribed to), the
deletion of a session (`keys.DELETED_CHANNEL`, heard by every API process) and
this process's own shutdown all resolve the futures of `expect_reply`.

Every keepalive interval the hub asks the store, in one round trip for all the
sessions it has clients of, which of them are gone and how far each one's log
goes: a deletion whose message was never published (its deleter lost Redis in
between) ends their streams and waits as a heard one does, and a stream reads
the log only when the store is past what it has sent, not at every keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Final

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.events import WAIT_ENDS, SessionDeleted, decode_head, sse_frame

logger = logging.getLogger("sandstream.hub")


class LiveEvent(msgspec.Struct, frozen=True):
    """An event off pub/sub, decoded and framed once for all of this process's clients."""

    seq: int
    type: str
    data: bytes
    frame: bytes


def live_event(seq: int, event_type: str, data: bytes) -> LiveEvent:
    return LiveEvent(seq, event_type, data, sse_frame(event_type, data, seq))


# Queue items are LiveEvents, or one of these markers.
RESYNC: Final = b""
# Put in every queue when the process starts shutting down.
DRAIN: Final = b"\x00drain"


class Tick(msgspec.Struct, frozen=True):
    """Put in every queue every keepalive interval, by one timer for the process
    rather than a timer per stream per wait: the session's latest seq as the hub
    just read it, or None when it could not."""

    latest: int | None


# Put in a session's queues when the session is deleted.
DELETED: Final = b"\x00deleted"
QueueItem = LiveEvent | Tick | bytes
_DELETED_DECODER = msgspec.json.Decoder(SessionDeleted)


class ClientQueue(asyncio.Queue[QueueItem]):
    """A client's pending events, which the hub keeps under `limit` bytes of frames."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.nbytes = 0

    def _put(self, item: QueueItem) -> None:
        if isinstance(item, LiveEvent):
            self.nbytes += len(item.frame)
        super()._put(item)

    def _get(self) -> QueueItem:
        item: QueueItem = super()._get()
        if isinstance(item, LiveEvent):
            self.nbytes -= len(item.frame)
        return item


def _confirm_all(waiting: list[asyncio.Future[None]], _: asyncio.Future[None]) -> None:
    for future in waiting:
        if not future.done():
            future.set_result(None)


class EventHub:
    def __init__(
        self,
        redis: Redis,
        tick_seconds: float = 15.0,
        client_buffer_bytes: int = 1 << 20,
        confirm_seconds: float = 10.0,
    ) -> None:
        self._redis = redis
        # How long a SUBSCRIBE may wait for the connection, and then for its
        # confirmation, before Redis counts as unavailable.
        self._confirm_seconds = confirm_seconds
        self._tick_seconds = tick_seconds
        self._buffer_bytes = client_buffer_bytes
        self._ticker: asyncio.Task[None] | None = None
        # Clients by session, and the sessions with clients by live channel.
        self._queues: dict[str, set[ClientQueue]] = {}
        self._channels: dict[bytes, set[str]] = {}
        self._pending: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        # This process's own channel, always subscribed: the terminal events of
        # the turns its blocking sends wait for arrive here (`expect_reply`).
        self.reply_channel = f"{keys.PREFIX}:api:{uuid.uuid4().hex}:replies"
        self._reply_channel = self.reply_channel.encode()
        # Waits on a turn's end, by turn id; each with its session's id.
        self._replies: dict[str, dict[asyncio.Future[bytes], str]] = {}
        self._reply_subscribed = False
        self._deleted_channel = keys.DELETED_CHANNEL.encode()
        self.draining = False

    @property
    def client_count(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._run())
        self._ticker = asyncio.create_task(self._tick())
        await asyncio.wait_for(self._ready.wait(), 10)

    async def stop(self) -> None:
        for task in (self._reader, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._tick_seconds)
            sids = list(self._queues)
            for sid, latest in zip(sids, await self._latest(sids), strict=True):
                if latest == -1:
                    self._session_deleted(sid)
                    continue
                tick = Tick(latest)
                for queue in self._queues.get(sid, ()):
                    self._offer(queue, tick)

    async def _latest(self, sids: list[str]) -> list[int | None]:
        """Each session's latest seq, -1 for one no longer in the store; asked in
        one round trip for all. None for all when the store did not answer: the
        streams then read the log themselves, and meet the trouble and say so."""
        if not sids:
            return []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.exists(keys.session(sid))
                    pipe.get(keys.seq(sid))
                found = await asyncio.wait_for(pipe.execute(), self._confirm_seconds)
        except (RedisError, OSError, TimeoutError):
            return [None] * len(sids)
        return [
            int(seq or 0) if exists else -1
            for exists, seq in zip(found[::2], found[1::2], strict=True)
        ]

    def drain(self) -> None:
        """The process is stopping: tell every client to go and reconnect elsewhere."""
        self.draining = True
        for queues in self._queues.values():
            for queue in queues:
                self._offer(queue, DRAIN)
        for waits in self._replies.values():
            for future in waits:
                if not future.done():
                    future.set_result(DRAIN)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, sid: str, buffer_bytes: int | None = None
    ) -> AsyncIterator[ClientQueue]:
        """A queue of the session's live events; subscribed before this returns.
        A wait that only needs the channel (its turn's end resolves `expect_reply`)
        asks for a buffer of 0 bytes: its queue never holds more than a marker."""
        channel = keys.LIVE_CHANNEL.encode()
        queue = ClientQueue(self._buffer_bytes if buffer_bytes is None else buffer_bytes)
        # The lock keeps the order of SUBSCRIBE and UNSUBSCRIBE on the wire the
        # order of our decisions: a client leaving while another arrives must
        # not end with the channel unsubscribed under the newcomer.
        async with self._lock:
            queues = self._queues.setdefault(sid, set())
            queues.add(queue)
            sessions = self._channels.setdefault(channel, set())
            sessions.add(sid)
            if len(sessions) == 1 and len(queues) == 1:
                confirmed = asyncio.get_running_loop().create_future()
                pending = self._pending.setdefault(channel, deque())
                pending.append(confirmed)
                try:
                    await self._send("SUBSCRIBE", channel)
                except BaseException:
                    # Not subscribed: no confirmation will come for this one,
                    # and the channel is not to be subscribed on a reconnect.
                    with contextlib.suppress(ValueError):  # confirmed meanwhile
                        pending.remove(confirmed)
                    # (the hub may have reconnected since, with a queue of its own)
                    if not pending and self._pending.get(channel) is pending:
                        del self._pending[channel]
                    queues.discard(queue)
                    if not queues and self._queues.get(sid) is queues:
                        del self._queues[sid]
                        self._leave_channel(channel, sid)
                    raise
        try:
            await self._wait_confirmed(channel)
            yield queue
        finally:
            queues.discard(queue)
            if not queues:
                # Off the caller's path (a blocking send's reply goes out now);
                # under the lock, so it stays ordered with newcomers' SUBSCRIBEs.
                task = asyncio.create_task(self._unsubscribe_if_unused(sid, channel, queues))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _unsubscribe_if_unused(
        self, sid: str, channel: bytes, queues: set[ClientQueue]
    ) -> None:
        async with self._lock:
            if not queues and self._queues.get(sid) is queues:
                del self._queues[sid]
                if self._leave_channel(channel, sid):
                    with contextlib.suppress(RedisConnectionError, OSError):
                        await self._send("UNSUBSCRIBE", channel)

    def _leave_channel(self, channel: bytes, sid: str) -> bool:
        """The session has no client here any more; True when its channel has none either."""
        sessions = self._channels.get(channel)
        if sessions is None:
            return False
        sessions.discard(sid)
        if sessions:
            return False
        del self._channels[channel]
        return True

    async def _wait_confirmed(self, channel: bytes) -> None:
        pending = self._pending.get(channel)
        if pending:
            try:
                await asyncio.wait_for(asyncio.shield(pending[-1]), self._confirm_seconds)
            except TimeoutError:
                # Redis holds the connection but answers nothing (stalled): the
                # store cannot serve now, which callers answer with 503.
                raise RedisTimeoutError("the subscription was not confirmed in time") from None

    async def _send(self, *args: str | bytes) -> None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), self._confirm_seconds)
            except TimeoutError:
                # Redis is down or restarting: the store cannot serve now (503).
                raise RedisConnectionError("the event hub has no connection to Redis") from None
        assert self._pubsub is not None
        await self._pubsub.execute_command(*args)

    async def _run(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                channels = list(self._channels)
                self._carry_over_confirmations(channels)
                await pubsub.subscribe(self._reply_channel, self._deleted_channel)
                if channels:
                    await pubsub.subscribe(*channels)
                self._pubsub = pubsub
                self._ready.set()
                connection = pubsub.connection
                assert connection is not None
                while True:
                    # Replies read straight off the connection: `PubSub.listen`
                    # wraps each in a retry and a dict, about 2 µs a message,
                    # and a message comes per live channel per batch of events.
                    reply = await connection.read_response(
                        disconnect_on_error=False, push_request=True
                    )
                    self._dispatch(reply)
            except (RedisConnectionError, OSError) as exc:
                logger.warning("event hub lost its Redis connection (%s); reconnecting", exc)
                self._ready.clear()
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _carry_over_confirmations(self, channels: list[bytes]) -> None:
        """A new connection: the confirmations still awaited were asked of the
        lost one, and none will come. Those of a channel subscribed again are
        all given by its new subscription's; the others have no one waiting
        (their channel has no client). Left queued, each would take the place of
        a later subscription's confirmation, and every subscription on the
        channel (of any session on it) would wait in vain."""
        lost, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for channel in channels:
            waiting = lost.get(channel)
            if waiting:
                confirmed: asyncio.Future[None] = loop.create_future()
                confirmed.add_done_callback(functools.partial(_confirm_all, list(waiting)))
                self._pending[channel] = deque([confirmed])

    def expect_reply(self, sid: str, turn_id: str) -> asyncio.Future[bytes]:
        """A future for the end of a wait on the turn: its terminal event (JSON),
        from this process's reply channel or a session channel it is subscribed
        to; RESYNC when such messages may have been missed (the connection to
        Redis was lost: the caller checks the log); DELETED when the session
        was deleted; DRAIN when this process is stopping."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self.draining:
            future.set_result(DRAIN)
        self._replies.setdefault(turn_id, {})[future] = sid
        return future

    def forget_reply(self, turn_id: str, future: asyncio.Future[bytes]) -> None:
        waits = self._replies.get(turn_id)
        if waits is not None:
            waits.pop(future, None)
            if not waits:
                del self._replies[turn_id]

    def _resolve(self, turn_id: str, data: bytes) -> None:
        for future in self._replies.get(turn_id, ()):
            if not future.done():
                future.set_result(data)

    def _dispatch(self, reply: list[bytes | int]) -> None:
        """One pub/sub reply: [kind, channel, data or subscription count]."""
        kind, channel, data = reply
        assert isinstance(channel, bytes)
        if channel == self._reply_channel:
            self._dispatch_reply(kind, data)
            return
        if channel == self._deleted_channel:
            if kind == b"message":
                self._dispatch_deleted(data)
            return
        if kind == b"message":
            assert isinstance(data, bytes)
            # One message carries a batch of events of the sessions on the
            # channel, one JSON document a line (JSON text never holds a raw
            # newline); each goes to the clients of the session it names.
            for line in data.split(b"\n") if b"\n" in data else (data,):
                try:
                    head = decode_head(line)
                except msgspec.DecodeError:
                    logger.error("undecodable event on %r", channel)
                    continue
                queues = self._queues.get(head.session_id)
                if not queues:
                    continue  # another session on the channel, not streamed here
                event = live_event(head.seq, head.type, line)
                for queue in queues:
                    self._offer(queue, event)
                if head.turn_id is not None and head.type in WAIT_ENDS:
                    self._resolve(head.turn_id, line)  # a wait on the turn ends
        elif kind == b"subscribe":
            pending = self._pending.get(channel)
            if pending:
                future = pending.popleft()
                if not pending:
                    del self._pending[channel]
                if not future.done():
                    future.set_result(None)
            else:
                # Re-subscribed after a reconnect: anything published in between
                # was missed, so every client on the channel refills from the log.
                for sid in self._channels.get(channel, ()):
                    for queue in self._queues.get(sid, ()):
                        self._offer(queue, RESYNC)

    def _dispatch_reply(self, kind: object, data: object) -> None:
        if kind == b"message":
            assert isinstance(data, bytes)
            try:
                # A terminal event, or the event with which a turn began to
                # wait for approval (`shared.approvals`).
                turn_id = decode_head(data).turn_id
            except msgspec.DecodeError:
                logger.error("undecodable reply on %r", self.reply_channel)
                return
            if turn_id:
                self._resolve(turn_id, data)
        elif kind == b"subscribe":
            if self._reply_subscribed:  # again, after a reconnect
                for waits in self._replies.values():
                    for future in waits:
                        if not future.done():
                            future.set_result(RESYNC)
            self._reply_subscribed = True

    def _dispatch_deleted(self, data: object) -> None:
        assert isinstance(data, bytes)
        try:
            sid = _DELETED_DECODER.decode(data).session_id
        except msgspec.DecodeError:
            logger.error("undecodable message on %r", self._deleted_channel)
            return
        self._session_deleted(sid)

    def _session_deleted(self, sid: str) -> None:
        """The session is gone: its streams end, and so do the waits on its turns."""
        for queue in self._queues.get(sid, ()):
            self._offer(queue, DELETED)
        for waits in self._replies.values():
            for future, waiting_sid in waits.items():
                if waiting_sid == sid and not future.done():
                    future.set_result(DELETED)

    @staticmethod
    def _offer(queue: ClientQueue, item: QueueItem) -> None:
        size = len(item.frame) if isinstance(item, LiveEvent) else 0
        if size and queue.nbytes + size > queue.limit:
            # Too slow to keep up: drop what is queued and let it read the log.
            # What ends a stream is kept (it would not be sent again).
            ends = [i for i in queue._queue if i in (DRAIN, DELETED)]  # type: ignore[attr-defined]
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(RESYNC)
            for end in ends:
                queue.put_nowait(end)
            return
        queue.put_nowait(item)
