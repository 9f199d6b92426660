"""StreamTransport: the SDKs' HTTP transport, lean enough for hundreds of streams.

The SDKs still make every request (auth, retries with backoff, status errors),
but under them, by default, each network read of a streaming response passes
through httpx, httpcore, h11 and anyio, with a cancel scope per read; with a few
hundred model streams in one worker that was most of its CPU left after
decoding. This transport speaks HTTP/1.1 over asyncio streams itself: a pool of
keep-alive connections per origin, requests written whole, responses framed by
`Content-Length`, chunked encoding or the connection's end, and the SDK's
timeouts (connect, read, write, pool) applied as httpx would. Errors are
httpx's own exceptions, so the SDKs retry and map them unchanged. Anything this
transport does not do (a proxy from the environment) leaves the SDK on its
default transport (`lean_http_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from shared.settings import Settings

_MAX_HEAD_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024
_MAX_CHUNK_LINE = 4096
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BODY = "sandstream.body"  # the response's extension that holds its `_Body`
_PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "https_proxy",
    "http_proxy",
    "all_proxy",
)

Origin = tuple[str, str, int]


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("SSL_CERT_FILE")
    if not cafile:
        with contextlib.suppress(ImportError):
            import certifi

            cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile)


def _chunk_size(line: bytes) -> int:
    """The size on a chunk's first line: hex digits only (Python's `int` would
    also take a sign, a 0x prefix and underscores), before any extensions."""
    digits = line.split(b";", 1)[0].rstrip(b" \t")
    if not _HEX.fullmatch(digits):
        raise httpx2.RemoteProtocolError("a chunk size is not a hex number")
    return int(digits, 16)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        self.writer.close()

    def unexpected_bytes(self) -> bool:
        """Whether the idle connection was closed, or sent bytes nobody asked for
        since its last response (they would be read as the next one's): either
        way it is not to be used again. (asyncio's StreamReader keeps what
        arrived in `_buffer` and has no public way to ask.)"""
        return self.reader.at_eof() or bool(self.reader._buffer)  # type: ignore[attr-defined]


async def _timed(awaitable: Any, seconds: float | None, error: type[Exception]) -> Any:
    """`awaitable`, or httpx's `error` past `seconds` (no task of its own)."""
    if seconds is None:
        return await awaitable
    try:
        async with asyncio.timeout(seconds):
            return await awaitable
    except TimeoutError:
        raise error("timed out") from None


class _Body(httpx2.AsyncByteStream):
    """A response body read off its connection, handed back to the pool once read whole.

    The read timeout is an idle timeout: one timer per body, pushed forward by
    each read (a float assignment) and re-armed only when it fires early, rather
    than a timer scheduled and cancelled around every read of every stream.
    When it expires, the connection is aborted and the read raises ReadTimeout.
    """

    def __init__(
        self,
        transport: StreamTransport,
        origin: Origin,
        connection: _Connection,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive
        self._read_timeout = read_timeout
        self._complete = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._read_once = False  # `pieces` was begun: the body is read only once

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None or self._read_timeout is None:
            return
        self._deadline = loop.time() + self._read_timeout
        self._timer = loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:  # read meanwhile: wait out the rest
            self._timer = loop.call_at(self._deadline, self._expire)
            return
        self._timer = None
        self._timed_out = True
        if self._connection is not None:
            self._connection.writer.transport.abort()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.pieces()

    def plain(self, encoding: str) -> bool:
        """The body is the content itself (no content coding to undo), so it can be
        read with `pieces` instead of through httpx's response."""
        return encoding in ("", "identity") and self._connection is not None and not self._read_once

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what each network read brought (without the
        chunked framing), one await per read."""
        if self._read_once:
            raise httpx2.StreamConsumed()
        self._read_once = True
        connection = self._connection
        if connection is None:
            return
        reader = connection.reader
        self._watch()
        try:
            if self._chunked:
                async for piece in self._chunks(reader):
                    yield piece
            elif self._length is not None:
                left = self._length
                while left:
                    piece = await self._read(reader.read(min(left, _READ_SIZE)))
                    if not piece:
                        raise httpx2.RemoteProtocolError("the body ended early")
                    left -= len(piece)
                    yield piece
            else:
                while piece := await self._read(reader.read(_READ_SIZE)):
                    yield piece
                self._keep_alive = False
            self._complete = True
        except (ConnectionError, OSError) as exc:
            if self._timed_out:
                raise httpx2.ReadTimeout("no data within the read timeout") from None
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from None
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        """A chunked body's data, per network read: a streamed response sends a
        chunk per event, so one read usually holds one or a few whole chunks,
        and a chunk larger than a read comes out in parts as it arrives."""
        buffer = b""
        left = 0  # bytes of the current chunk's data still to come
        crlf = False  # the CRLF that ends a chunk's data is still to come
        while True:
            out: list[bytes] = []
            at, size = 0, len(buffer)
            while at < size:
                if left:
                    take = min(left, size - at)
                    out.append(buffer[at : at + take])
                    at += take
                    left -= take
                    crlf = not left
                    continue
                if crlf:
                    if size - at < 2:
                        break
                    if buffer[at : at + 2] != b"\r\n":
                        raise httpx2.RemoteProtocolError("a chunk did not end with CRLF")
                    at += 2
                    crlf = False
                    continue
                end = buffer.find(b"\r\n", at, at + _MAX_CHUNK_LINE)
                if end < 0:
                    if size - at >= _MAX_CHUNK_LINE:
                        raise httpx2.RemoteProtocolError("a chunk size line is too long")
                    break
                left = _chunk_size(buffer[at:end])
                at = end + 2
                if not left:  # the last chunk: then trailers, up to an empty line
                    if out:  # what came is not held back while they are awaited
                        yield out[0] if len(out) == 1 else b"".join(out)
                    tail = buffer[at:]
                    while not (tail[:2] == b"\r\n" or b"\r\n\r\n" in tail):
                        if len(tail) > _MAX_HEAD_BYTES:
                            raise httpx2.RemoteProtocolError("the trailers are too large")
                        more = await self._read(reader.read(_READ_SIZE))
                        if not more:
                            raise httpx2.RemoteProtocolError("the chunked body ended early")
                        tail += more
                    end = 2 if tail[:2] == b"\r\n" else tail.index(b"\r\n\r\n") + 4
                    if len(tail) > end:  # more than the response: not a connection to reuse
                        self._keep_alive = False
                    return
            buffer = buffer[at:]
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            data = await self._read(reader.read(_READ_SIZE))
            if not data:
                raise httpx2.RemoteProtocolError("the chunked body ended early")
            buffer = buffer + data if buffer else data

    async def _read(self, awaitable: Any) -> bytes:
        try:
            data: bytes = await awaitable
        except asyncio.IncompleteReadError:
            if self._timed_out:
                raise httpx2.ReadTimeout("no data within the read timeout") from None
            raise httpx2.RemoteProtocolError("the body ended early") from None
        if self._timer is not None:
            self._deadline = asyncio.get_running_loop().time() + (self._read_timeout or 0)
        if not data and self._timed_out:
            raise httpx2.ReadTimeout("no data within the read timeout")
        return data

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and self._keep_alive:
            self._transport.release(self._origin, connection)
        else:
            connection.close()


def body_of(response: httpx2.Response) -> _Body | None:
    """The body of a response this transport made, to read with `_Body.pieces`
    (one await per network read, not the half-dozen layers of httpx's and the
    SDK's byte iterators per chunk), when it carries the content as it is; None
    otherwise (another transport, a content coding to undo, a body read already)."""
    body = response.extensions.get(_BODY)
    if isinstance(body, _Body) and body.plain(response.headers.get("content-encoding", "")):
        return body
    return None


class StreamTransport(httpx2.AsyncBaseTransport):
    def __init__(self, max_idle_per_origin: int = 100) -> None:
        self._idle: dict[Origin, list[_Connection]] = {}
        self._max_idle = max_idle_per_origin
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        origin = (scheme, url.host, url.port or (443 if scheme == "https" else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        head = self._head(request, body)
        for attempt in (0, 1):
            connection = await self._acquire(origin, timeouts.get("connect"))
            try:
                await _timed(
                    self._send(connection, head, body), timeouts.get("write"), httpx2.WriteTimeout
                )
                status, reason, headers = await self._read_head(connection, timeouts.get("read"))
            except (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError):
                connection.close()
                if connection.reused and attempt == 0:
                    continue  # the server had closed it while it sat in the pool
                raise
            except BaseException:
                connection.close()
                raise
            break
        names = {name.lower(): value for name, value in headers}
        chunked = b"chunked" in names.get(b"transfer-encoding", b"").lower()
        length = (
            None if chunked or b"content-length" not in names else int(names[b"content-length"])
        )
        keep_alive = names.get(b"connection", b"").lower() != b"close"
        if request.method == "HEAD" or status in (204, 304):
            length, chunked = 0, False
        stream = _Body(self, origin, connection, length, chunked, keep_alive, timeouts.get("read"))
        return httpx2.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason, _BODY: stream},
        )

    @staticmethod
    def _head(request: httpx2.Request, body: bytes) -> bytes:
        target = request.url.raw_path
        lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
        for name, value in request.headers.raw:
            lines.append(name + b": " + value)
        if body and b"content-length" not in {n.lower() for n, _ in request.headers.raw}:
            lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    @staticmethod
    async def _send(connection: _Connection, head: bytes, body: bytes) -> None:
        try:
            connection.writer.write(head + body)
            await connection.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise httpx2.WriteError(str(exc) or type(exc).__name__) from None

    @staticmethod
    async def _read_head(
        connection: _Connection, timeout: float | None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        try:
            raw = await _timed(
                connection.reader.readuntil(b"\r\n\r\n"), timeout, httpx2.ReadTimeout
            )
        except asyncio.IncompleteReadError:
            raise httpx2.RemoteProtocolError("the server closed the connection") from None
        except asyncio.LimitOverrunError:
            raise httpx2.RemoteProtocolError("the response head is too large") from None
        except (ConnectionError, OSError) as exc:
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from None
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx2.RemoteProtocolError("malformed status line")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx2.RemoteProtocolError("malformed header line")
            headers.append((name.strip(), value.strip()))
        return int(parts[1]), parts[2] if len(parts) > 2 else b"", headers

    async def _acquire(self, origin: Origin, timeout: float | None) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not (connection.writer.is_closing() or connection.unexpected_bytes()):
                connection.reused = True
                return connection
            connection.close()
        scheme, host, port = origin
        if scheme == "https" and self._ssl is None:
            self._ssl = _ssl_context()
        try:
            reader, writer = await _timed(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self._ssl if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                    limit=_MAX_HEAD_BYTES,
                ),
                timeout,
                httpx2.ConnectTimeout,
            )
        except (OSError, ssl.SSLError) as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__) from None
        return _Connection(reader, writer)

    def release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) < self._max_idle and not connection.writer.is_closing():
            idle.append(connection)
        else:
            connection.close()

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


def model_timeouts(settings: Settings) -> httpx2.Timeout:
    """The model call's timeouts: connecting, the response's head and every next
    read each get `provider_idle_timeout_seconds` (a stalled model is found out
    that soon), sending the request and waiting for a pooled connection get
    `provider_timeout_seconds`."""
    idle = settings.provider_idle_timeout_seconds
    return httpx2.Timeout(settings.provider_timeout_seconds, connect=idle, read=idle)


def lean_http_client(timeout: httpx2.Timeout) -> httpx2.AsyncClient | None:
    """An httpx client on `StreamTransport` for an SDK, or None (keep the SDK's
    default) when the environment names a proxy, which this transport does not speak."""
    if any(os.environ.get(n) or os.environ.get(n.lower()) for n in _PROXY_VARIABLES):
        return None
    return httpx2.AsyncClient(transport=StreamTransport(), timeout=timeout)
