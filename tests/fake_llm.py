"""A local model API that speaks Anthropic's and OpenAI's real streaming wire formats.

Tests script each reply (status, SSE chunks, pacing, a cut connection) per model
name, so concurrent tests do not share scripts; the official SDKs in the worker
parse the bytes exactly as they would from the real services. Every request and
every client disconnect is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from helpers import free_port

Json = dict[str, Any]


@dataclass
class Reply:
    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    delay: float = 0.0
    cut: bool = False  # drop the connection after the chunks instead of ending cleanly
    error: Json | None = None
    # A stalled model: wait this long (or until the client leaves) before the
    # response head, or after the chunks before ending the body.
    head_stall: float = 0.0
    body_stall: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Json
    at: float


class FakeLLM:
    def __init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self.requests: dict[str, list[Received]] = defaultdict(list)
        self.disconnects: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        config = uvicorn.Config(
            self._app, host="127.0.0.1", port=self.port, log_level="warning", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake model server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def script(self, model: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[model].extend(replies)

    async def _app(self, scope: Json, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw or b"{}")
        model = str(body.get("model", ""))
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        with self._lock:
            self.requests[model].append(Received(scope["path"], headers, body, time.monotonic()))
            script = self._scripts[model]
            reply = (
                script.popleft() if script else Reply(status=500, error={"message": "no script"})
            )
        if reply.status != 200:
            payload = json.dumps(_error_body(scope["path"], reply)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"retry-after-ms", b"10"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return

        async def watch_disconnect() -> None:
            message = await receive()
            if message["type"] == "http.disconnect":
                with self._lock:
                    self.disconnects[model].append(time.monotonic())

        watcher = asyncio.create_task(watch_disconnect())
        if reply.head_stall:
            await asyncio.wait([watcher], timeout=reply.head_stall)
            if watcher.done():
                return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        try:
            for chunk in reply.chunks:
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                if watcher.done():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if reply.body_stall:
                await asyncio.wait([watcher], timeout=reply.body_stall)
                if watcher.done():
                    return
            if reply.cut:
                raise ConnectionAbortedError("scripted cut")  # uvicorn drops the connection
            await send({"type": "http.response.body", "body": b""})
            await asyncio.sleep(0.05)
        finally:
            watcher.cancel()


def _error_body(path: str, reply: Reply) -> Json:
    error = reply.error or {}
    message = error.get("message", f"scripted HTTP {reply.status}")
    if path.endswith("/messages"):
        kinds = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}
        return {
            "type": "error",
            "error": {"type": kinds.get(reply.status, "api_error"), "message": message},
        }
    return {"error": {"message": message, "type": "server_error", "code": None}}


# ---- Anthropic Messages streaming ---------------------------------------------

_ids = itertools.count(1)


def _sse(event: str, data: Json) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def anthropic_stream(
    *blocks: tuple[Any, ...], stop: str = "end_turn", tokens: tuple[int, int] = (11, 7)
) -> list[bytes]:
    """Blocks: ("text", [pieces...]) or ("tool", id, name, input)."""
    chunks = [
        _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_{next(_ids)}",
                    "type": "message",
                    "role": "assistant",
                    "model": "fake",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": tokens[0], "output_tokens": 1},
                },
            },
        )
    ]
    for index, block in enumerate(blocks):
        if block[0] == "text":
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in block[1]]
        else:
            _, call_id, name, arguments = block
            start = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
            text = json.dumps(arguments)
            half = len(text) // 2
            deltas = [
                {"type": "input_json_delta", "partial_json": part}
                for part in (text[:half], text[half:])
            ]
        chunks.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        chunks += [
            _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        ]
        chunks.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    chunks.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": tokens[1]},
            },
        )
    )
    chunks.append(_sse("message_stop", {"type": "message_stop"}))
    return chunks


# ---- OpenAI chat completions streaming ---------------------------------------


def _chunk(choices: list[Json], usage: Json | None = None) -> bytes:
    data: Json = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake",
        "choices": choices,
    }
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n".encode()


def openai_stream(
    *blocks: tuple[Any, ...], stop: str = "stop", tokens: tuple[int, int] = (11, 7)
) -> list[bytes]:
    """Blocks: ("text", [pieces...]) or ("tool", id, name, input); text comes first."""
    chunks = [_chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
    call_index = 0
    for block in blocks:
        if block[0] == "text":
            chunks += [
                _chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
                for piece in block[1]
            ]
            continue
        _, call_id, name, arguments = block
        text = json.dumps(arguments)
        half = len(text) // 2
        first = {
            "index": call_index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": text[:half]},
        }
        rest = {"index": call_index, "function": {"arguments": text[half:]}}
        chunks.append(
            _chunk([{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}])
        )
        chunks.append(
            _chunk([{"index": 0, "delta": {"tool_calls": [rest]}, "finish_reason": None}])
        )
        call_index += 1
    chunks.append(_chunk([{"index": 0, "delta": {}, "finish_reason": stop}]))
    usage = {
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "total_tokens": sum(tokens),
    }
    chunks.append(_chunk([], usage))
    chunks.append(b"data: [DONE]\n\n")
    return chunks
