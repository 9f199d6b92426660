"""The provider interface: history, system prompt and tools in, a normalized stream out.

Providers know nothing of Redis, events or SSE; the turn loop maps their stream
to session events and to the stored assistant message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec

from shared.events import Usage
from shared.models import Message
from worker.tools import ToolSpec


class TextChunk(msgspec.Struct, frozen=True):
    text: str


class ToolCallStart(msgspec.Struct, frozen=True):
    id: str
    name: str


class ToolCallReady(msgspec.Struct, frozen=True):
    id: str
    name: str
    input: dict[str, Any]


ModelStop = Literal["end_turn", "tool_use", "max_tokens"]


class MessageEnd(msgspec.Struct, frozen=True):
    stop_reason: ModelStop
    usage: Usage


StreamItem = TextChunk | ToolCallStart | ToolCallReady | MessageEnd


class ProviderRequest(msgspec.Struct, frozen=True, kw_only=True):
    system: str
    # The session's history; the last message is this turn's assistant message
    # so far (text, tool calls and tool results of earlier iterations).
    messages: list[Message]
    tools: list[ToolSpec]


class ProviderError(Exception):
    """A model call that failed for good; `code` is the stable code clients see."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_arguments(raw: str) -> dict[str, Any]:
    """A tool call's JSON arguments; anything but an object reaches the tool as invalid."""
    if not raw.strip():
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return {"invalid_arguments": raw}
    return value if isinstance(value, dict) else {"invalid_arguments": raw}


class Provider(Protocol):
    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]: ...
