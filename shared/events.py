"""The session events and their SSE wire format (DESIGN §3).

Workers encode an event without its `seq`; the append script assigns the seq
and splices it in as the first JSON member, so the seq and the log position can
never disagree. The API relays the stored JSON verbatim.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.models import FileChange, Message, StopReason

TERMINAL_TYPES = frozenset({"session_completed", "session_failed"})
# What ends a wait on a turn (a blocking send, an interrupt): its end, or its
# beginning to wait for approval of tool calls (the send then answers 202).
APPROVAL_REQUESTED = "tool_approval_requested"
APPROVAL_RESOLVED = "tool_approval_resolved"
WAIT_ENDS = TERMINAL_TYPES | {APPROVAL_REQUESTED}


class _Event(msgspec.Struct, kw_only=True, tag_field="type"):
    session_id: str
    sandbox_id: str
    turn_id: str
    message_id: str
    created_at: str


class TextDelta(_Event, tag="text_delta"):
    index: int
    text: str


class TextComplete(_Event, tag="text_complete"):
    index: int
    text: str


class ToolUseStart(_Event, tag="tool_use_start"):
    index: int
    id: str
    name: str


class ToolUseComplete(_Event, tag="tool_use_complete"):
    index: int
    id: str
    name: str
    input: dict[str, Any]


class ToolResult(_Event, tag="tool_result"):
    index: int
    tool_use_id: str
    content: str
    is_error: bool


class ToolApprovalRequested(_Event, tag="tool_approval_requested"):
    index: int
    tool_use_id: str
    name: str
    input: dict[str, Any]
    expires_at: str


class ToolApprovalResolved(_Event, tag="tool_approval_resolved"):
    index: int
    tool_use_id: str
    decision: Literal["allow", "deny"]
    reason: str
    # The id of the key or grant that decided (never the key), or `timeout`.
    decided_by: str


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0


class SessionCompleted(_Event, tag="session_completed"):
    message: Message
    stop_reason: Literal["end_turn", "interrupted", "max_iterations"]
    usage: Usage
    # What the turn created, modified or deleted in the workspace (at most
    # `FILES_CHANGED_MAX`); `files_changed_truncated` when there was more, or
    # when the workspace could not be compared whole.
    files_changed: list[FileChange] = msgspec.field(default_factory=list)
    files_changed_truncated: bool = False


class ErrorInfo(msgspec.Struct, kw_only=True):
    code: str
    message: str


class SessionFailed(_Event, tag="session_failed"):
    error: ErrorInfo
    stop_reason: Literal["error", "timeout", "worker_lost"]
    message: Message | None = None


Event = (
    TextDelta
    | TextComplete
    | ToolUseStart
    | ToolUseComplete
    | ToolResult
    | ToolApprovalRequested
    | ToolApprovalResolved
)
TerminalEvent = SessionCompleted | SessionFailed


class EventHead(msgspec.Struct):
    """The few members the API needs to route a stored event without decoding it all."""

    seq: int
    type: str
    turn_id: str | None = None
    # Every stored event names its session: the live channel is shared.
    session_id: str = ""


class TerminalView(msgspec.Struct):
    """A terminal event as the blocking send reads it."""

    seq: int
    type: str
    turn_id: str
    stop_reason: StopReason
    message: Message | None = None
    error: ErrorInfo | None = None


class Keepalive(msgspec.Struct, kw_only=True, tag_field="type", tag="keepalive"):
    """Sent without an `id:` (it must not move the client's cursor) each keepalive
    interval: the session's latest seq, so a client can see what it missed."""

    session_id: str
    sandbox_id: str
    latest_seq: int
    created_at: str


class LogTruncated(msgspec.Struct, kw_only=True, tag_field="type", tag="log_truncated"):
    """The events after `after` up to `first_seq` are no longer in the log; the
    stream goes on from `first_seq`. The client refetches the session."""

    session_id: str
    after: int
    first_seq: int
    detail: str = "events before first_seq are no longer retained; refetch the session"


class Reconnect(msgspec.Struct, kw_only=True, tag_field="type", tag="reconnect"):
    """The stream ends here; the client resumes with its Last-Event-ID."""

    session_id: str | None
    detail: str


class SessionDeleted(msgspec.Struct, kw_only=True, tag_field="type", tag="session_deleted"):
    """The session was deleted: the last event of its streams. Also what the API
    publishes to its processes (`keys.DELETED_CHANNEL`) so that each ends its own
    streams and waiting sends of the session."""

    session_id: str
    created_at: str


Notice = Keepalive | LogTruncated | Reconnect | SessionDeleted


_encoder = msgspec.json.Encoder()
_head_decoder = msgspec.json.Decoder(EventHead)
_terminal_decoder = msgspec.json.Decoder(TerminalView)


def encode_event(event: Event | TerminalEvent) -> bytes:
    return _encoder.encode(event)


def decode_head(data: bytes) -> EventHead:
    return _head_decoder.decode(data)


def decode_terminal(data: bytes) -> TerminalView:
    return _terminal_decoder.decode(data)


def notice_frame(notice: Notice) -> bytes:
    """A frame of one of the stream's own events; they carry no seq."""
    tag = notice.__struct_config__.tag
    assert isinstance(tag, str)
    return sse_frame(tag, _encoder.encode(notice), None)


def sse_frame(event_type: str, data: bytes, seq: int | None) -> bytes:
    """One SSE frame; `data` is single-line JSON. Events without a seq carry no `id:`."""
    head = b"" if seq is None else b"id: %d\n" % seq
    return head + b"event: " + event_type.encode() + b"\ndata: " + data + b"\n\n"
