"""A lean HTTP/1.1 keep-alive client for the throughput benchmark's load.

The load generator shares the machine's two cores with Redis and the service;
httpx spends several times the CPU this does per request, and every cycle it
takes is one the service under test does not get. This sends one prepared JSON
POST at a time on its own connection and reads the whole response
(`Content-Length` framing, as uvicorn answers a non-streamed request).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, base: str) -> Connection:
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        return cls(reader, writer)

    async def request(self, prepared: bytes) -> tuple[int, bytes]:
        """Send a request made by `prepare`; the response's status and body."""
        self._writer.write(prepared)
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        body = await self._reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self._writer.close()


def prepare(method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
