"""Many SSE clients on raw sockets, light enough for thousands in one process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import urlsplit

import httpx
import msgspec

from bench.harness import ROOT, _wait, free_port, percentile, rss_bytes


class _Stamp(msgspec.Struct):
    type: str
    t: float | None = None
    created_at: str | None = None


def _sent_at(stamp: _Stamp) -> float:
    if stamp.t is not None:
        return stamp.t
    assert stamp.created_at is not None
    return datetime.fromisoformat(stamp.created_at.replace("Z", "+00:00")).timestamp()


async def _open(
    url: str, headers: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    lines = [
        f"GET {parts.path}?{parts.query} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: text/event-stream",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    while (await reader.readline()).strip():  # status line and headers
        pass
    return reader, writer


async def _receive(reader: asyncio.StreamReader, event: str) -> float:
    decoder = msgspec.json.Decoder(_Stamp)
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("stream ended")
        start = line.find(b"data: {")
        if start >= 0 and b'"type":"' + event.encode() + b'"' in line:
            received = time.time()
            payload = line[start + 6 :]
            # chunked transfer encoding may leave a size line; the JSON is intact
            return received - _sent_at(decoder.decode(payload.strip()))


def open_streams(
    url: str,
    headers: dict[str, str],
    count: int,
    trigger: Callable[[], object],
    pid: int,
    *,
    event: str,
) -> list[str]:
    """Open `count` streams, measure the server's memory per idle stream, fire one
    event and measure when each stream gets it. Returns the table cells."""

    async def run() -> list[str]:
        before = rss_bytes(pid)
        connections = []
        for batch in range(0, count, 200):
            connections += await asyncio.gather(
                *(_open(url, headers) for _ in range(min(200, count - batch)))
            )
        await asyncio.sleep(1.0)
        per_stream = (rss_bytes(pid) - before) / count
        waiting = [asyncio.create_task(_receive(r, event)) for r, _ in connections]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(trigger)
        latencies = await asyncio.wait_for(asyncio.gather(*waiting), 120)
        for _, writer in connections:
            writer.close()
        return [
            f"{percentile(latencies, 0.5) * 1000:.1f}",
            f"{percentile(latencies, 0.99) * 1000:.1f}",
            f"{per_stream / 1024:.1f}",
        ]

    return asyncio.run(run())


@contextmanager
def bare_sse_server() -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_sse", str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.post(base + "/publish").status_code == 204, "the bare SSE server")
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait()
