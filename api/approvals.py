"""Approvals of tool calls: decide one, and what sends and interrupts do while a turn waits.

The waiting itself, and why it holds no worker, is `shared.approvals`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, post

from api.browser import absolute_url
from api.guard import principal_of
from api.problems import Problem
from api.schemas import ApprovalResult, TurnAccepted
from api.services import Services, check_id, decode_body, owned_session, services_of
from shared import events as ev
from shared.approvals import Resolution
from shared.models import (
    ApprovalDecision,
    Message,
    SessionState,
    ToolResultBlock,
    ToolUseBlock,
    now_rfc3339,
)

# The longest tool_use id accepted in a path; providers' ids are far shorter.
MAX_TOOL_USE_ID = 200


def _not_found(sid: str, tool_use_id: str) -> Problem:
    return Problem(
        404,
        "approval_not_found",
        f"session {sid} has no tool call {tool_use_id!r} awaiting approval",
        tool_use_id=tool_use_id,
    )


class ApprovalController(Controller):
    path = "/api/v1"

    @post(
        "/sessions/{sid:str}/approvals/{tool_use_id:str}",
        status_code=200,
        opt={"scope": "approve"},
    )
    async def decide(
        self, request: Request[Any, Any, Any], sid: str, tool_use_id: str
    ) -> ApprovalResult:
        """Allow or deny one tool call of the turn awaiting approval."""
        svc = services_of(request)
        principal = principal_of(request)
        await owned_session(svc, check_id("session", sid), principal.tenant)
        body = await decode_body(request, ApprovalDecision, empty_ok=False)
        if len(tool_use_id) > MAX_TOOL_USE_ID:
            raise _not_found(sid, tool_use_id[:MAX_TOOL_USE_ID] + "...")
        store = svc.approvals
        waiting = await store.waiting(sid)
        call = before = None
        if waiting is not None:
            call = next((p for p in waiting.pending if p.tool_use_id == tool_use_id), None)
            before = waiting.decided.get(tool_use_id)
        resolution = Resolution(
            decision=body.decision,
            reason=body.reason,
            decided_by=principal.key_id,
            decided_at=now_rfc3339(),
        )
        outcome = "waiting"
        if waiting is not None and call is not None:
            outcome, before = await store.resolve(
                sid=sid,
                tenant=principal.tenant,
                waiting=waiting,
                mode="decide",
                decisions=[(call, resolution)],
            )
        turn_id = waiting.turn_id if waiting is not None else ""
        if before is None and (call is None or outcome == "missing"):
            # Decided already, and the turn went on: by another client that was
            # faster, or by this one in a request whose answer was lost.
            found = await store.decision(sid, tool_use_id)
            if found is None:
                raise _not_found(sid, tool_use_id)
            turn_id, before = found
            outcome = "decided"
        if before is not None:
            if before.decision != body.decision:
                raise Problem(
                    409,
                    "approval_conflict",
                    f"tool call {tool_use_id!r} was decided {before.decision!r} already",
                    tool_use_id=tool_use_id,
                    decision=before.decision,
                )
            resolution = before  # the same decision again: a retry, answered alike
        state: SessionState = "running" if outcome == "resumed" else "awaiting_approval"
        if outcome == "decided":
            session = await svc.store.get_session(sid)
            state = session.state if session is not None else "active"
        return ApprovalResult(
            session_id=sid,
            turn_id=turn_id,
            tool_use_id=tool_use_id,
            decision=resolution.decision,
            reason=resolution.reason,
            decided_by=resolution.decided_by,
            decided_at=resolution.decided_at,
            state=state,
        )


def awaiting_problem(sid: str, turn_id: str) -> Problem:
    """A send while the turn waits for approval."""
    return Problem(
        409,
        "turn_in_progress",
        f"session {sid}'s turn {turn_id} is awaiting approval of tool calls; decide them "
        f"(POST /api/v1/sessions/{sid}/approvals/{{tool_use_id}}) or interrupt the turn",
        turn_id=turn_id,
        state="awaiting_approval",
    )


async def awaiting_reply(
    request: Request[Any, Any, Any], svc: Services, sid: str, turn_id: str, after: int
) -> Response[bytes]:
    """The blocking send's answer when its turn begins to wait: 202 and the calls."""
    waiting = await svc.approvals.waiting(sid)
    pending = waiting.pending if waiting is not None and waiting.turn_id == turn_id else []
    body = TurnAccepted(
        session_id=sid,
        turn_id=turn_id,
        state="awaiting_approval" if pending else "running",
        detail="the turn awaits approval of tool calls: decide each one"
        if pending
        else "the turn is still running; follow it on the stream or read the session",
        stream_url=absolute_url(request, f"/api/v1/sessions/{sid}/stream?after={after}"),
        session_url=absolute_url(request, f"/api/v1/sessions/{sid}"),
        pending_approvals=pending,
    )
    return Response(
        content=msgspec.json.encode(body),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/api/v1/sessions/{sid}"},
    )


async def end_waiting_turn(
    svc: Services, sid: str, sandbox_id: str, turn_id: str, *, awaiting: bool
) -> bool:
    """Interrupt a turn that awaits approval, or whose continuation no worker
    has started yet, here and at once: its message so far is kept, each call
    that did not run is answered as interrupted. False when the turn never
    waited, or a worker started it meanwhile (interrupt it as any other)."""
    store = svc.approvals
    record = await store.suspended_record(sid, turn_id)
    if record is None:
        return False
    blocks = list(record.blocks)
    answered = {b.tool_use_id for b in blocks if isinstance(b, ToolResultBlock)}
    results: list[ev.Event] = []
    ids = {
        "session_id": sid,
        "sandbox_id": sandbox_id,
        "turn_id": turn_id,
        "message_id": record.message_id,
    }
    text = (
        "[interrupted while awaiting approval] the tool did not run"
        if awaiting
        else "[interrupted before the tool ran] the tool did not run"
    )
    for block in record.blocks:
        if isinstance(block, ToolUseBlock) and block.id not in answered:
            results.append(
                ev.ToolResult(
                    **ids,
                    created_at=now_rfc3339(),
                    index=len(blocks),
                    tool_use_id=block.id,
                    content=text,
                    is_error=True,
                )
            )
            blocks.append(ToolResultBlock(tool_use_id=block.id, content=text, is_error=True))
    message = Message(
        id=record.message_id,
        session_id=sid,
        role="assistant",
        content=blocks,
        timestamp=now_rfc3339(),
        turn_id=turn_id,
        stop_reason="interrupted",
    )
    terminal = ev.SessionCompleted(
        session_id=sid,
        sandbox_id=sandbox_id,
        turn_id=turn_id,
        message_id=record.message_id,
        created_at=now_rfc3339(),
        message=message,
        stop_reason="interrupted",
        usage=record.usage,
    )
    # "unstarted": a waiting turn has no worker; one that resumed meanwhile has.
    ended = await svc.store.finish_turn(
        sid, turn_id, "unstarted", message, terminal, events=results
    )
    if ended:
        await store.forget(sid)
    return bool(ended)
