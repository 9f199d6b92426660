"""Response bodies of the API beyond the resources themselves."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from api.grants import DEFAULT_SCOPES, Scope
from shared.models import PendingApproval, SessionState


class ProblemDetails(msgspec.Struct, kw_only=True):
    """RFC 9457 problem details; some problems add members (`field`, `turn_id`, ...)."""

    type: str
    title: str
    status: int
    code: str
    detail: str
    instance: str | None = None


class TurnAccepted(msgspec.Struct, kw_only=True):
    """The reply of a send whose wait limit passed before the turn ended, or
    whose turn began to wait for approval of tool calls (`pending_approvals`)."""

    session_id: str
    turn_id: str
    state: Literal["running", "awaiting_approval"]
    detail: str
    stream_url: str
    session_url: str
    pending_approvals: list[PendingApproval] = msgspec.field(default_factory=list)


class ApprovalResult(msgspec.Struct, kw_only=True):
    """A tool call's decision as recorded; `state` is the session's after it
    (`running` once no call waits any more and the turn goes on; for a decision
    made before, the session's state now)."""

    session_id: str
    turn_id: str
    tool_use_id: str
    decision: Literal["allow", "deny"]
    reason: str
    decided_by: str
    decided_at: str
    state: SessionState


class InterruptResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    session_id: str
    interrupted: bool
    state: Literal["active", "running"]
    turn_id: str | None = None


class StreamToken(msgspec.Struct, kw_only=True):
    """Opens one session's stream, for reading only, as `?token=` (`api.grants`):
    by its URL alone for `opens_for` seconds, and with `Last-Event-ID` (how
    EventSource reconnects) until it expires."""

    token: str
    opens_for: int
    expires_in: int
    expires_at: str
    stream_url: str


class CreateGrant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a tenant's backend asks for when it mints a browser credential."""

    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(DEFAULT_SCOPES)
    )
    expires_in: Annotated[int, msgspec.Meta(ge=1)] | None = None


class BrowserGrant(msgspec.Struct, kw_only=True):
    """A browser credential for one session: `Authorization: Bearer <token>`."""

    token: str
    session_id: str
    scopes: list[Scope]
    expires_in: int
    expires_at: str
    session_url: str
    stream_token_url: str


class Credential(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the presented key or browser credential is and may do."""

    kind: Literal["key", "browser"]
    tenant: str
    admin: bool
    session_id: str | None = None
    scopes: list[Scope] | None = None
    expires_at: str | None = None


class Health(msgspec.Struct, kw_only=True):
    status: str
