"""A paced model server for the streaming benchmark, in a process of its own.

    python -m bench.paced_model PORT [--chunks 100] [--interval 0.02]

It answers OpenAI chat completions (`POST /v1/chat/completions`) and Anthropic
Messages (`POST /v1/messages`) with a real streaming response in each wire
format: `--chunks` text chunks, one every `--interval` seconds on an absolute
schedule, each chunk's text a stamp `<index>@<wall clock when written> `, so a
reader anywhere can tell how late each chunk reached it. Plain asyncio on
uvloop with HTTP/1.1 keep-alive and chunked framing: the server itself must not
be what limits a few hundred concurrent streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(data: dict[str, object], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data, separators=(",", ":")) + "\n\n").encode()


class OpenAIWire:
    def start(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def text(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def end(self, chunks: int) -> list[bytes]:
        usage = {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": chunks + 10}
        done = self._chunk({}, finish="stop")
        tail = {"id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 0}
        tail |= {"model": "paced", "choices": [], "usage": usage}
        return [done, _sse(tail), b"data: [DONE]\n\n"]

    @staticmethod
    def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {"id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 0}
        return _sse(body | {"model": "paced", "choices": [choice]})


class AnthropicWire:
    def start(self) -> list[bytes]:
        message = {
            "id": "msg_paced",
            "type": "message",
            "role": "assistant",
            "model": "paced",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        }
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        return [
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse(block, "content_block_start"),
        ]

    def text(self, text: str) -> bytes:
        delta = {"type": "content_block_delta", "index": 0}
        return _sse(delta | {"delta": {"type": "text_delta", "text": text}}, "content_block_delta")

    def end(self, chunks: int) -> list[bytes]:
        return [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": chunks},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]


WIRES = {b"/v1/chat/completions": OpenAIWire(), b"/v1/messages": AnthropicWire()}
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
)


async def _stream(
    writer: asyncio.StreamWriter, wire: OpenAIWire | AnthropicWire, chunks: int, interval: float
) -> None:
    writer.write(HEAD + b"".join(_frame(part) for part in wire.start()))
    started = time.monotonic()
    for index in range(chunks):
        delay = started + index * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(_frame(wire.text(f"{index}@{time.time():.6f} ")))
    writer.write(b"".join(_frame(part) for part in wire.end(chunks)) + b"0\r\n\r\n")
    await writer.drain()


async def _serve(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chunks: int, interval: float
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1].split(b"?")[0]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            wire = WIRES.get(path)
            if wire is None:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                continue
            await _stream(writer, wire, chunks, interval)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, chunks: int, interval: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(r, w, chunks, interval), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.chunks, args.interval))
