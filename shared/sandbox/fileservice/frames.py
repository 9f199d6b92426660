"""The service's end of the protocol: frames on stdin and stdout.

A frame is a kind byte, a 4-byte big-endian length and a payload. `J` carries a
JSON object (a request, or a reply); `D` a chunk of file or archive bytes; `E`
ends a run of `D` frames; `A` (client to service only) abandons one. One
request at a time: a request is a `J`; an operation that takes data (an upload,
an archive to extract) answers `J {"ready": true}` first and then reads `D`
frames up to an `E` or `A`; one that gives data writes `D` frames and an `E`,
or a `J` refusal in place of the `E` when it fails part way. An operation that
fails while data is still coming answers at once, then reads on to the `E` or
`A` the client sends when it sees the answer, so client and service never wait
on each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from typing import TYPE_CHECKING

from .paths import Refused

if TYPE_CHECKING:  # typing costs the service's start-up time
    from typing import Any, BinaryIO


HEADER = struct.Struct(">cI")
JSON, DATA, END, ABORT = b"J", b"D", b"E", b"A"
MAX_JSON_BYTES = 64 << 20
MAX_DATA_BYTES = 4 << 20
CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031


class ProtocolError(Exception):
    """The client broke the protocol; the service exits."""


class Aborted(Exception):
    """The client abandoned the data it was sending."""


def widen_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe (the unprivileged maximum): fewer wake-ups per MB."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)


class Frames:
    def __init__(self, requests: BinaryIO, replies: int) -> None:
        self._in = requests
        self._out = replies
        # Data still coming for an operation that ended early; drained after its reply.
        self.pending: DataIn | None = None

    # ---- reading ------------------------------------------------------------------

    def read(self) -> tuple[bytes, bytes] | None:
        head = self._in.read(HEADER.size)
        if len(head) < HEADER.size:
            return None
        kind, size = HEADER.unpack(head)
        if kind not in (JSON, DATA, END, ABORT):
            raise ProtocolError(f"unknown frame kind {kind!r}")
        if size > (MAX_JSON_BYTES if kind == JSON else MAX_DATA_BYTES):
            raise ProtocolError("frame too large")
        payload = self._in.read(size) if size else b""
        if len(payload) < size:
            return None
        return kind, payload

    def read_request(self) -> dict[str, Any] | None:
        """The next request; None at the end of input."""
        frame = self.read()
        if frame is None:
            return None
        kind, payload = frame
        if kind != JSON:
            raise ProtocolError("expected a request")
        request = json.loads(payload)
        if not isinstance(request, dict):
            raise ProtocolError("a request is a JSON object")
        return request

    def data_in(self, limit: int) -> DataIn:
        self.pending = DataIn(self, limit)
        return self.pending

    def settle(self) -> None:
        """After a reply: read on past what is left of the data the client sent."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.drain()

    # ---- writing ------------------------------------------------------------------

    def _write(self, *parts: bytes) -> None:
        views = [memoryview(p) for p in parts if p]
        while views:
            written = os.writev(self._out, views)
            while written and views:
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0

    def write_json(self, reply: dict[str, Any]) -> None:
        # A name that is not UTF-8 decodes with surrogates here; the client
        # accepts UTF-8 only, so such characters go out as U+FFFD.
        payload = json.dumps(reply, ensure_ascii=False).encode("utf-8", "replace")
        self._write(HEADER.pack(JSON, len(payload)), payload)

    def write_data(self, data: bytes | memoryview) -> None:
        for start in range(0, len(data), MAX_DATA_BYTES):
            piece = data[start : start + MAX_DATA_BYTES]
            self._write(HEADER.pack(DATA, len(piece)), bytes(piece))

    def write_end(self) -> None:
        self._write(HEADER.pack(END, 0))


class DataIn:
    """The `D` frames of one operation as a file to read, up to `limit` bytes."""

    def __init__(self, frames: Frames, limit: int) -> None:
        self._frames = frames
        self.limit = limit
        self.received = 0
        self.finished = False
        self._buffer = memoryview(b"")

    def _next(self) -> bool:
        """Take the next frame; False at the end of the data."""
        if self.finished:
            return False
        frame = self._frames.read()
        if frame is None:
            raise ProtocolError("input ended inside a data stream")
        kind, payload = frame
        if kind == DATA:
            self.received += len(payload)
            if self.received > self.limit:
                raise Refused(f"the data is larger than {self.limit} bytes", "too_large")
            self._buffer = memoryview(payload)
            return True
        self.finished = True
        if kind == ABORT:
            raise Aborted
        if kind != END:
            raise ProtocolError("a request arrived inside a data stream")
        return False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            parts = [bytes(self._buffer)]
            self._buffer = memoryview(b"")
            while self._next():
                parts.append(bytes(self._buffer))
            self._buffer = memoryview(b"")
            return b"".join(parts)
        while not self._buffer:
            if not self._next():
                return b""
        piece, self._buffer = self._buffer[:size], self._buffer[size:]
        return bytes(piece)

    def peek(self, size: int) -> bytes:
        """Up to `size` bytes from the start of what is left, without taking them."""
        while len(self._buffer) < size and not self.finished:
            rest = bytes(self._buffer)
            if not self._next():
                self._buffer = memoryview(rest)
                break
            self._buffer = memoryview(rest + bytes(self._buffer))
        return bytes(self._buffer[:size])

    def chunks(self) -> Any:
        """Each frame's bytes in turn (no copy into a bigger buffer)."""
        if self._buffer:
            yield bytes(self._buffer)
            self._buffer = memoryview(b"")
        while self._next():
            yield self._buffer
            self._buffer = memoryview(b"")

    def drain(self) -> None:
        """Read and drop the rest, up to the `E` or `A`."""
        self._buffer = memoryview(b"")
        while not self.finished:
            frame = self._frames.read()
            if frame is None:
                raise ProtocolError("input ended inside a data stream")
            if frame[0] != DATA:
                self.finished = True
