"""Anthropic Messages API, streaming, through the official `anthropic` SDK.

The SDK reads `ANTHROPIC_API_KEY` and `ANTHROPIC_BASE_URL`, and retries rate
limits and server errors with backoff before we see an exception.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import msgspec

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

_STOP_REASONS: dict[str, ModelStop] = {"tool_use": "tool_use", "max_tokens": "max_tokens"}


def _merge_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The API wants user and assistant to alternate: join neighbours of one role."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if not message["content"]:
            continue
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"].extend(message["content"])
        else:
            merged.append({"role": message["role"], "content": list(message["content"])})
    return merged


def to_anthropic_messages(history: list[Message]) -> list[dict[str, Any]]:
    """Our messages as Messages API turns.

    An assistant message of ours holds a whole turn: text and tool calls, then
    their results, then more text... The API wants the calls in an assistant
    turn and their results in the following user turn, so the message is split
    wherever results follow calls.
    """
    out: list[dict[str, Any]] = []
    for message in history:
        if message.role == "user":
            out.append({"role": "user", "content": [_user_part(b) for b in message.content]})
            continue
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                part: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": block.tool_use_id,
                    "content": block.content,
                }
                if block.is_error:
                    part["is_error"] = True
                out.append({"role": "user", "content": [part]})
            elif isinstance(block, ToolUseBlock):
                call = {
                    "type": "tool_use",
                    "id": block.id,
                    "name": block.name,
                    "input": block.input,
                }
                out.append({"role": "assistant", "content": [call]})
            elif isinstance(block, TextBlock) and block.text:
                out.append({"role": "assistant", "content": [{"type": "text", "text": block.text}]})
    return _merge_roles(out)


def _user_part(block: object) -> dict[str, Any]:
    if isinstance(block, ImageBlock):
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": block.media_type, "data": block.data},
        }
    assert isinstance(block, TextBlock)
    return {"type": "text", "text": block.text}


def to_anthropic_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "description": t.description, "input_schema": t.input_schema}
        for t in tools
    ]


class _Block(msgspec.Struct):
    type: str = ""
    id: str = ""
    name: str = ""
    text: str = ""


class _Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    stop_reason: str | None = None


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _Message(msgspec.Struct):
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    """One Messages stream event: the members read, nothing else."""

    type: str
    index: int = 0
    content_block: _Block | None = None
    delta: _Delta | None = None
    message: _Message | None = None
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_event_decoder = msgspec.json.Decoder(_Event)


class AnthropicProvider:
    name = "anthropic"

    def __init__(self, model: str, settings: Settings) -> None:
        self.model = model
        self.max_tokens = settings.max_output_tokens
        self.client = anthropic.AsyncAnthropic(
            max_retries=settings.provider_max_retries,
            timeout=model_timeouts(settings),
            http_client=lean_http_client(model_timeouts(settings)),
        )
        self._secrets = [os.environ.get("ANTHROPIC_API_KEY", "")]
        # Resolved once, off the event loop (see the OpenAI provider).
        self._create = self.client.messages.with_streaming_response.create

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        body: dict[str, Any] = {"messages": to_anthropic_messages(request.messages)}
        if request.system:
            body["system"] = request.system
        if request.tools:
            body["tools"] = to_anthropic_tools(request.tools)
        # The conversation goes in `extra_body`, already in the wire format (see
        # the OpenAI provider: the SDK's transform of it is most of a call's CPU).
        stream = guarded_stream(
            anthropic,
            "Anthropic",
            self._secrets,
            lambda: self._create(
                model=self.model,
                max_tokens=self.max_tokens,
                messages=[],
                stream=True,
                extra_body=body,
            ),
            self._read,
        )
        async for item in stream:
            yield item

    async def _read(self, response: Any) -> AsyncIterator[StreamItem]:
        usage = Usage()
        stop_reason: ModelStop = "end_turn"
        calls: dict[int, tuple[str, str, list[str]]] = {}
        finished = False
        async for batch in event_batches(response):
            text: list[str] = []  # the text deltas of this read, given as one
            for data in batch:
                try:
                    event = _event_decoder.decode(data)
                except msgspec.DecodeError:
                    raise ProviderError(
                        "provider_protocol", "Anthropic sent an unreadable event"
                    ) from None
                kind = event.type
                if kind == "content_block_delta" and event.delta is not None:
                    if event.delta.type == "text_delta":
                        text.append(event.delta.text)
                    elif event.delta.type == "input_json_delta" and event.index in calls:
                        calls[event.index][2].append(event.delta.partial_json)
                    continue
                if text:
                    yield TextChunk("".join(text))
                    text = []
                if kind == "message_start" and event.message and event.message.usage:
                    usage.input_tokens = event.message.usage.input_tokens or 0
                    usage.output_tokens = event.message.usage.output_tokens or 0
                elif kind == "content_block_start" and event.content_block is not None:
                    block = event.content_block
                    if block.type == "tool_use":
                        calls[event.index] = (block.id, block.name, [])
                        yield ToolCallStart(block.id, block.name)
                    elif block.type == "text" and block.text:
                        text.append(block.text)
                elif kind == "content_block_stop" and event.index in calls:
                    call_id, name, parts = calls.pop(event.index)
                    yield ToolCallReady(call_id, name, parse_arguments("".join(parts)))
                elif kind == "message_delta":
                    if event.delta is not None:
                        stop_reason = _STOP_REASONS.get(event.delta.stop_reason or "", "end_turn")
                    if event.usage is not None and event.usage.output_tokens is not None:
                        usage.output_tokens = event.usage.output_tokens
                elif kind == "message_stop":
                    finished = True
                elif kind == "error":
                    error = event.error or {}
                    message = str(error.get("message") or "an error occurred mid-stream")
                    raise anthropic.APIStatusError(
                        message, response=response.http_response, body={"error": error}
                    )
            if text:
                yield TextChunk("".join(text))
        if not finished:
            raise stream_cut("Anthropic")
        yield MessageEnd(stop_reason, usage)
