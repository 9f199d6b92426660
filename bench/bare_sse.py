"""The baseline for SSE fan-out: a bare Litestar SSE endpoint fed from in-process queues.

python -m bench.bare_sse PORT
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import msgspec
import uvicorn
from litestar import Litestar, get, post
from litestar.response import Stream

_queues: set[asyncio.Queue[bytes]] = set()


@get("/stream")
async def stream() -> Stream:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    _queues.add(queue)

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b": open\n\n"
            while True:
                yield b"event: tick\ndata: " + await queue.get() + b"\n\n"
        finally:
            _queues.discard(queue)

    return Stream(frames(), media_type="text/event-stream")


@post("/publish", status_code=204)
async def publish(burst: int = 1, size: int = 0) -> None:
    """`burst` events of about `size` bytes to every stream, the last of type `last`."""
    for i in range(burst):
        kind = "last" if i == burst - 1 else "tick"
        data = msgspec.json.encode({"type": kind, "t": time.time(), "pad": "x" * size})
        for queue in _queues:
            queue.put_nowait(data)


app = Litestar([stream, publish])

if __name__ == "__main__":
    # The same server settings as sandstream's API (api/__main__.py).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
        loop="uvloop",
        http="httptools",
    )
