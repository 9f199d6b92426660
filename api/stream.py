"""GET /sessions/{sid}/stream: the session's events as Server-Sent Events (DESIGN §3)."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.response import Stream
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.feed import Cursor
from api.guard import principal_of, tenant_of
from api.hub import DELETED, DRAIN, RESYNC, EventHub, LiveEvent, QueueItem, Tick
from api.memory import trim_soon
from api.metrics import SSE_CONNECTIONS
from api.problems import Problem
from api.reconnect import come_back_later, until_expiry
from api.services import owned_session, services_of
from api.write_timeout import EventStream
from shared import eventlog, keys
from shared.events import Keepalive, LogTruncated, Reconnect, SessionDeleted, notice_frame
from shared.models import now_rfc3339

logger = logging.getLogger("sandstream.api")

# A seq as a client may send it: ASCII digits, small enough for Redis's 64-bit ids.
SEQ = re.compile(r"[0-9]{1,18}")
# How soon a client should reconnect after a stream ends (SSE `retry:`), in ms.
RECONNECT_MS = 1000


def _cursor(request: Request[Any, Any, Any], after: str | None) -> str | None:
    return request.headers.get("last-event-id") or after


class StreamController(Controller):
    path = "/api/v1/sessions"

    @get("/{sid:str}/stream", opt={"scope": "stream", "stream_token": True, "sse": True})
    async def stream(
        self,
        request: Request[Any, Any, Any],
        sid: str,
        after: str | None = None,
        token: str | None = None,
    ) -> Stream | Response[bytes]:
        """SSE. Browsers, which cannot send headers, pass a stream token as `?token=`."""
        if request.state.retry_ms is not None:
            return come_back_later(
                sid, request.state.retry_ms, "too many stream connections with this credential"
            )
        svc = services_of(request)
        session = await owned_session(svc, sid, tenant_of(request))
        raw = _cursor(request, after)
        if raw is None:
            start = await eventlog.latest_seq(svc.redis, sid)
        elif SEQ.fullmatch(raw):
            start = int(raw)
        else:
            raise Problem(
                400,
                "invalid_parameter",
                "Last-Event-ID and `after` must be a seq: a non-negative integer below 10^18",
                field="after",
            )
        events = session_events(svc.redis, svc.hub, sid, session.sandbox_id, start)
        grant = principal_of(request).grant
        return EventStream(
            events if grant is None else until_expiry(events, grant),
            write_timeout=svc.settings.stream_write_timeout_seconds,
            last_words=_reconnect_frame(sid, "this client accepted nothing for too long"),
            media_type="text/event-stream",
            # The connection ends with the stream: one dropped for accepting
            # nothing is closed, not kept for a next request.
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "close"},
        )


async def session_events(
    redis: Redis, hub: EventHub, sid: str, sandbox_id: str, after: int
) -> AsyncIterator[bytes]:
    """The stream's body: the events after `after`, from the log and then live,
    with the stream's own notices in between (`api.feed` says how)."""
    # The one generator a live event passes through per stream (each layer
    # costs every event on every stream); `api.feed`'s Cursor refills it.
    SSE_CONNECTIONS.inc()
    try:
        async with hub.subscribe(sid) as queue:
            # The body starts at once, so proxies and clients see the stream is
            # open; `retry` tells EventSource how soon to come back if it drops,
            # and `id` where from, even if it drops before the first event.
            yield f"retry: {RECONNECT_MS}\nid: {after}\n: stream open\n\n".encode()
            if hub.draining:
                yield _reconnect_frame(sid, "this API process is shutting down")
                return
            cursor = Cursor(redis, sid, after)
            async for frame in _refill(cursor, sid):
                yield frame
            pending: QueueItem | None = None
            while True:
                item = await queue.get() if pending is None else pending
                pending = None
                if isinstance(item, LiveEvent):
                    if item.seq == cursor.last + 1:
                        cursor.last = item.seq
                        frames = item.frame
                        # What else is queued already goes out in the same write:
                        # a burst of events costs one send per stream, not one each.
                        while not queue.empty():
                            more = queue.get_nowait()
                            if isinstance(more, LiveEvent) and more.seq == cursor.last + 1:
                                cursor.last = more.seq
                                frames += more.frame
                            else:
                                pending = more
                                break
                        yield frames
                        continue
                    if item.seq <= cursor.last:
                        continue
                    # A gap: what is missing (and this one) comes from the log.
                elif isinstance(item, Tick):
                    # Quiet for a while. The hub has asked the store for all its
                    # sessions at once (a deleted one is sent DELETED instead):
                    # the log is read only when it holds what this stream has not
                    # sent (a lost message), or when the hub could not ask.
                    if item.latest is None or item.latest > cursor.last:
                        async for frame in _refill(cursor, sid):
                            yield frame
                    yield notice_frame(
                        Keepalive(
                            session_id=sid,
                            sandbox_id=sandbox_id,
                            latest_seq=max(item.latest or 0, cursor.latest, cursor.last),
                            created_at=now_rfc3339(),
                        )
                    )
                    continue
                elif item == RESYNC:
                    # Messages were missed (the hub lost its connection): the
                    # session's deletion may be among them.
                    if not await redis.exists(keys.session(sid)):
                        yield notice_frame(SessionDeleted(session_id=sid, created_at=now_rfc3339()))
                        return
                    # Refilled from the log, for what was missed.
                    async for frame in _refill(cursor, sid):
                        yield frame
                    continue
                elif item == DRAIN:
                    yield _reconnect_frame(sid, "this API process is shutting down")
                    return
                elif item == DELETED:
                    yield notice_frame(SessionDeleted(session_id=sid, created_at=now_rfc3339()))
                    return
                # A gap: refill from the log.
                async for frame in _refill(cursor, sid):
                    yield frame
    except (RedisError, OSError):
        # Redis is gone or cannot serve: end the stream and say when to come back; the client
        # resumes from its Last-Event-ID, so nothing is lost.
        yield _reconnect_frame(sid, "the store is unavailable")
    finally:
        SSE_CONNECTIONS.dec()
        trim_soon()


async def _refill(cursor: Cursor, sid: str) -> AsyncIterator[bytes]:
    async for item in cursor.refill():
        if isinstance(item, LiveEvent):
            yield item.frame
        else:
            yield notice_frame(
                LogTruncated(session_id=sid, after=item.after, first_seq=item.first_seq)
            )


def _reconnect_frame(sid: str, reason: str) -> bytes:
    notice = Reconnect(session_id=sid, detail=f"{reason}; reconnect")
    return f"retry: {RECONNECT_MS}\n".encode() + notice_frame(notice)
