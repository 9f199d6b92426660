"""Streams that drop a client which accepts nothing for too long.

A client that stops reading without closing (a suspended laptop, a stuck proxy)
would otherwise keep its connection, its subscription and its stream's
generator for ever; its unsent events wait nowhere (the hub's buffer for it is
capped in bytes, and it would refill from the log). So each write of a stream's
body may take at most the write timeout.

A timer per write (`asyncio.timeout`) costs a timer handle armed and cancelled
for every write of every stream, which showed in the fan-out benchmark. Instead
each stream notes when its current write began, and one watchdog per process
looks every fraction of the timeout and cancels the writes that are overdue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from litestar import Request
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Message, Receive, Scope, Send

logger = logging.getLogger("sandstream.api")


class EventStream(Stream):
    """A streamed response whose client is dropped after accepting nothing for
    `write_timeout` seconds; `last_words` is what it is sent then (if its socket
    takes it within a second)."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        write_timeout: float,
        last_words: bytes,
        **kw: Any,
    ) -> None:
        super().__init__(content, **kw)
        self._write_timeout = write_timeout
        self._last_words = last_words

    def to_asgi_response(
        self, app: Any, request: Request[Any, Any, Any], **kw: Any
    ) -> ASGIResponse:
        response = super().to_asgi_response(app, request, **kw)
        assert isinstance(response, ASGIStreamingResponse)
        return _WatchedResponse(response, self._write_timeout, self._last_words)


class _ClientStuck(Exception):
    pass


class _Write:
    """A stream's write in progress: since when, and whether it is overdue."""

    __slots__ = ("since", "stuck", "task", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.since = 0.0  # 0 between writes
        self.stuck = False
        self.task: asyncio.Task[Any] | None = None


class _Watchdog:
    def __init__(self) -> None:
        self._writes: set[_Write] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, write: _Write) -> None:
        self._writes.add(write)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    def discard(self, write: _Write) -> None:
        self._writes.discard(write)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._writes:
            period = min(1.0, min(w.timeout for w in self._writes) / 4)
            await asyncio.sleep(period)
            now = loop.time()
            for write in list(self._writes):
                overdue = write.since and now - write.since > write.timeout
                if overdue and not write.stuck and write.task is not None:
                    write.stuck = True
                    write.task.cancel()


_watchdog = _Watchdog()


class _WatchedResponse(ASGIResponse):
    def __init__(self, inner: ASGIStreamingResponse, timeout: float, last_words: bytes) -> None:
        self._inner = inner
        self._timeout = timeout
        self._last_words = last_words

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        write = _Write(self._timeout)

        async def watched_send(message: Message) -> None:
            write.task = asyncio.current_task()
            write.since = loop.time()
            try:
                await send(message)
            except asyncio.CancelledError:
                if not write.stuck:
                    raise
                # Our own cancellation, as `asyncio.timeout` does it.
                assert write.task is not None
                write.task.uncancel()
                raise _ClientStuck from None
            finally:
                write.since = 0.0

        _watchdog.add(write)
        try:
            await self._inner(scope, receive, watched_send)
        except* _ClientStuck:
            logger.warning("a stream client accepted nothing for %g s; dropped", self._timeout)
            iterator = self._inner.iterator
            if isinstance(iterator, AsyncGenerator):
                await iterator.aclose()
            # The socket is full: the last words go out only if the client reads
            # again soon. Either way the connection is closed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self._timeout)):
                    await send(
                        {"type": "http.response.body", "body": self._last_words, "more_body": False}
                    )
        finally:
            _watchdog.discard(write)
