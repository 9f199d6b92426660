"""OpenAI-compatible chat completions, streaming, through the official `openai` SDK.

The same code serves OpenAI and servers that speak its API (vLLM, Ollama,
llama.cpp server, LM Studio) through `OPENAI_BASE_URL`; the SDK also reads
`OPENAI_API_KEY` and retries rate limits and server errors with backoff.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
import openai
from openai._constants import RAW_RESPONSE_HEADER
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from shared.events import Usage
from shared.models import ImageBlock, Message, TextBlock, ToolResultBlock, ToolUseBlock
from shared.settings import Settings
from worker.providers.base import (
    MessageEnd,
    ModelStop,
    ProviderError,
    ProviderRequest,
    StreamItem,
    TextChunk,
    ToolCallReady,
    ToolCallStart,
    parse_arguments,
)
from worker.providers.sdk import event_batches, guarded_stream, stream_cut
from worker.providers.transport import lean_http_client, model_timeouts
from worker.tools import ToolSpec

_STOP_REASONS: dict[str, ModelStop] = {"tool_calls": "tool_use", "length": "max_tokens"}


def to_openai_messages(system: str, history: list[Message]) -> list[dict[str, Any]]:
    """Our messages as chat completion messages.

    One assistant message of ours becomes, per model response, an assistant
    message (its text and `tool_calls`) followed by one `tool` message per result.
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for message in history:
        if message.role == "user":
            out.append({"role": "user", "content": _user_content(message)})
            continue
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                if text or calls:
                    out.append(_assistant(text, calls))
                    text, calls = [], []
                # Tool messages have no error flag: the model reads it in the content.
                content = f"[tool error] {block.content}" if block.is_error else block.content
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
            elif isinstance(block, ToolUseBlock):
                calls.append(
                    {
                        "id": block.id,
                        "type": "function",
                        "function": {
                            "name": block.name,
                            "arguments": openai_arguments(block.input),
                        },
                    }
                )
            elif isinstance(block, TextBlock):
                if calls:  # text after calls belongs to the next response
                    out.append(_assistant(text, calls))
                    text, calls = [], []
                text.append(block.text)
        if text or calls:
            out.append(_assistant(text, calls))
    return out


def openai_arguments(arguments: dict[str, Any]) -> str:
    return msgspec.json.encode(arguments).decode()


def _assistant(text: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user_content(message: Message) -> str | list[dict[str, Any]]:
    if all(isinstance(b, TextBlock) for b in message.content):
        return "\n\n".join(b.text for b in message.content if isinstance(b, TextBlock))
    parts: list[dict[str, Any]] = []
    for block in message.content:
        if isinstance(block, ImageBlock):
            url = f"data:{block.media_type};base64,{block.data}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
    return parts


def to_openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.input_schema,
            },
        }
        for t in tools
    ]


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Chunk(msgspec.Struct):
    """One `chat.completion.chunk`: the members read, nothing else."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class OpenAIProvider:
    name = "openai"

    def __init__(self, model: str, settings: Settings) -> None:
        self.model = model
        self.max_tokens = settings.max_output_tokens
        self.client = openai.AsyncOpenAI(
            max_retries=settings.provider_max_retries,
            timeout=model_timeouts(settings),
            http_client=lean_http_client(model_timeouts(settings)),
        )
        self._secrets = [os.environ.get("OPENAI_API_KEY", "")]
        # Resolved once: the SDK imports its resource modules (and builds their
        # pydantic models) on first access, most of a second of CPU, which must
        # not happen on the event loop in the first turn (`ProviderFactory`
        # makes providers in a thread).
        self.client.chat.completions.with_streaming_response.create  # noqa: B018
        self._stream_cls = openai.AsyncStream[ChatCompletionChunk]
        # The endpoint's URL, merged with the client's base URL once (the SDK
        # merges a relative path on every request: two more URL parses).
        self._url = str(self.client._prepare_url("/chat/completions"))

    def _post(self, body: bytes) -> AbstractAsyncContextManager[Any]:
        """`chat.completions.with_streaming_response.create(...)`, its body already
        encoded: the request the SDK makes for it (auth, headers, retries, error
        mapping), without the SDK's per-call walk of its parameters against its
        TypedDicts and its JSON encoding (tests/test_providers_request.py holds
        the two requests equal)."""
        return _Streamed(
            self.client.post(
                self._url,
                cast_to=ChatCompletion,
                content=body,
                options={"headers": {RAW_RESPONSE_HEADER: "stream"}, "security": _BEARER},
                stream=True,
                stream_cls=self._stream_cls,
            )
        )

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        body: dict[str, Any] = {
            "messages": to_openai_messages(request.system, request.messages),
            "model": self.model,
            "stream": True,
            "max_tokens": self.max_tokens,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = to_openai_tools(request.tools)
        # The body goes to the SDK already in the wire format, encoded: the SDK
        # would otherwise walk every message and tool schema, against its
        # TypedDicts, on every model call (most of a call's CPU, growing with
        # the history) to produce the same JSON.
        encoded = msgspec.json.encode(body)
        stream = guarded_stream(
            openai, "OpenAI", self._secrets, lambda: self._post(encoded), self._read
        )
        async for item in stream:
            yield item

    async def _read(self, response: Any) -> AsyncIterator[StreamItem]:
        usage = Usage()
        stop: ModelStop | None = None
        # index -> [id, name, argument pieces]; a call is complete when the next
        # one starts or the response finishes.
        calls: dict[int, tuple[str, str, list[str]]] = {}
        ready: set[int] = set()
        async for batch in event_batches(response):
            text: list[str] = []  # the text deltas of this read, given as one
            for data in batch:
                if data == b"[DONE]":
                    break
                try:
                    chunk = _chunk_decoder.decode(data)
                except msgspec.DecodeError:
                    raise ProviderError(
                        "provider_protocol", "OpenAI sent an unreadable chunk"
                    ) from None
                if chunk.error is not None:
                    message = str(chunk.error.get("message") or "an error occurred mid-stream")
                    request = response.http_response.request
                    raise openai.APIError(message, request, body=chunk.error)
                if chunk.usage is not None:
                    usage.input_tokens = chunk.usage.prompt_tokens or 0
                    usage.output_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta is not None and delta.content:
                        text.append(delta.content)
                    for call in (delta.tool_calls if delta is not None else None) or []:
                        if text:
                            yield TextChunk("".join(text))
                            text = []
                        if call.index not in calls:
                            for earlier in sorted(set(calls) - ready):
                                ready.add(earlier)
                                yield _ready(calls[earlier])
                            name = call.function.name if call.function else None
                            calls[call.index] = (call.id or f"call_{call.index}", name or "", [])
                            yield ToolCallStart(calls[call.index][0], calls[call.index][1])
                        if call.function and call.function.arguments:
                            calls[call.index][2].append(call.function.arguments)
                    if choice.finish_reason:
                        stop = _STOP_REASONS.get(choice.finish_reason, "end_turn")
            if text:
                yield TextChunk("".join(text))
        if stop is None:
            raise stream_cut("OpenAI")
        for index in sorted(set(calls) - ready):
            yield _ready(calls[index])
        yield MessageEnd("tool_use" if calls else stop, usage)


# What the SDK's `chat.completions.create` asks of the client's auth.
_BEARER: Any = {"bearer_auth": True}


class _Streamed:
    """The SDK's streamed response to a request, closed on the way out (as
    `with_streaming_response` does)."""

    __slots__ = ("_request", "_response")

    def __init__(self, request: Awaitable[Any]) -> None:
        self._request = request
        self._response: Any = None

    async def __aenter__(self) -> Any:
        self._response = await self._request
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            await self._response.close()


def _ready(call: tuple[str, str, list[str]]) -> ToolCallReady:
    call_id, name, parts = call
    return ToolCallReady(call_id, name, parse_arguments("".join(parts)))
