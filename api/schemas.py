"""Response bodies of the API beyond the resources themselves."""

from __future__ import annotations

from typing import Literal

import msgspec


class ProblemDetails(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details; some problems add members (`field`, `turn_id`, ...)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None


class TurnAccepted(msgspec.Struct, kw_only=True):
    """The reply of a send whose wait limit passed before the turn ended."""

    session_id: str
    turn_id: str
    state: Literal["running"]
    detail: str
    stream_url: str
    session_url: str


class InterruptResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    session_id: str
    interrupted: bool
    state: Literal["active", "running"]
    turn_id: str | None = None


class StreamToken(msgspec.Struct, kw_only=True):
    token: str
    expires_in: int
    stream_url: str


class Health(msgspec.Struct, kw_only=True):
    status: str
