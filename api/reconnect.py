"""What a stream answers instead of an error status, so browsers come back.

`EventSource` retries by itself after a network error or a stream that ends,
but gives up for good on any HTTP status other than 200 (a 429, 502 or 503
included). So where a REST route would say "busy" or "unavailable", a stream
request from a browser (`Accept: text/event-stream`) gets a 200 stream that says
so in a `reconnect` event, with a `retry:` hint of when to come back, and ends:
the page reconnects with its `Last-Event-ID` and loses nothing. What must end a
page (401: the credential is no good; 404: no such session) stays an error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Request, Response

from api.grants import Grant
from shared.events import sse_frame

logger = logging.getLogger("sandstream.api")

# How soon a browser should come back after the store was unreachable, in ms.
STORE_RETRY_MS = 2000


def _reconnect(sid: str | None, retry_ms: int, detail: str) -> bytes:
    payload = {"type": "reconnect", "session_id": sid, "detail": detail}
    return f"retry: {retry_ms}\n".encode() + sse_frame(
        "reconnect", msgspec.json.encode(payload), None
    )


def come_back_later(sid: str | None, retry_ms: int, detail: str) -> Response[bytes]:
    """A stream that tells the client to reconnect in `retry_ms` and ends."""
    return Response(
        content=_reconnect(sid, retry_ms, detail),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def wants_event_stream(request: Request[Any, Any, Any]) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def stream_aware(
    handler: Callable[[Request[Any, Any, Any], Exception], Response[Any]],
) -> Callable[[Request[Any, Any, Any], Exception], Response[Any]]:
    """The store-unavailable handler, but a browser's stream gets a retry instead of a 503."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        route = request.scope.get("route_handler")
        if wants_event_stream(request) and route is not None and route.opt.get("sse"):
            logger.warning("store unreachable; stream client told to come back: %s", exc)
            return come_back_later(
                request.path_params.get("sid"),
                STORE_RETRY_MS,
                "the store is unavailable; reconnect",
            )
        return handler(request, exc)

    return handle


async def until_expiry(chunks: AsyncIterator[bytes], grant: Grant) -> AsyncIterator[bytes]:
    """A granted stream ends when its grant does (checked at each write, so within a
    keepalive interval): a leaked token's stream does not outlive the token. The
    `grant_expired` event tells the page to renew; reconnecting with the old token
    would get 401."""
    try:
        async for chunk in chunks:
            yield chunk
            if grant.seconds_left() <= 0:
                payload = {
                    "type": "grant_expired",
                    "session_id": grant.session_id,
                    "detail": "this credential expired; get a new one and resume with ?after=",
                }
                yield sse_frame("grant_expired", msgspec.json.encode(payload), None)
                return
    finally:
        # Closing the stream's own generator runs its cleanup now, not at GC.
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
