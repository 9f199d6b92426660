"""Limits on a request's head (request line and headers), in the API process itself.

uvicorn's C parser (httptools) keeps no limit of its own: a client sending a
64 MiB header made one process hold all of it. Users may run the API without a
proxy in front, so the process enforces what a proxy would: at most
`SANDSTREAM_MAX_HEADER_BYTES` of head and `SANDSTREAM_MAX_HEADERS` header
fields, counted as the bytes arrive (before the parser buffers them); past
either, the answer is 431 and the connection closes.
"""

from __future__ import annotations

from typing import Any

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared.settings import Settings

_TERMINATOR = b"\r\n\r\n"


def _response_431(detail: str) -> bytes:
    body = msgspec.json.encode(
        {
            "type": "https://sandstream.dev/problems/headers_too_large",
            "title": "Headers too large",
            "status": 431,
            "code": "headers_too_large",
            "detail": detail,
        }
    )
    head = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/problem+json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


class _TooManyHeaders(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded request heads. The limits come
    from the environment (read once per process), so the class can be named in
    uvicorn's config for one process or several."""

    _limits: tuple[int, int] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if LimitedHttpToolsProtocol._limits is None:
            settings = Settings.from_env()
            LimitedHttpToolsProtocol._limits = (settings.max_header_bytes, settings.max_headers)
        self._max_bytes, self._max_headers = LimitedHttpToolsProtocol._limits
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""  # the last bytes seen, for a terminator split across reads
        self._headers = 0

    def data_received(self, data: bytes) -> None:
        if self._in_head and self._head_too_large(data):
            self._refuse(f"the request line and headers exceed {self._max_bytes} bytes")
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._headers > self._max_headers:
                self._refuse(f"a request may have at most {self._max_headers} header fields")
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the head, with these bytes, passes the limit before it ends."""
        room = self._max_bytes - self._head_bytes
        window = self._tail + data[:room]
        self._head_bytes += len(data)
        self._tail = (self._tail + data)[-3:]
        if self._head_bytes <= self._max_bytes:
            return False
        return _TERMINATOR not in window

    def _refuse(self, detail: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(_response_431(detail))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > self._max_headers:
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What follows on this connection is the next request's head.
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
