"""Sessions: create, list, read, delete, send a message, interrupt (DESIGN §2, §4)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post

from api.approvals import awaiting_reply, end_waiting_turn
from api.browser import absolute_url
from api.guard import tenant_of
from api.idempotency import claim_or_replay, released_on_error
from api.pagination import paged_response
from api.problems import Problem, not_found
from api.schemas import InterruptResult, TurnAccepted
from api.services import (
    Services,
    check_id,
    decode_body,
    owned_sandbox,
    owned_session,
    page_limit,
    publish_interrupt,
    services_of,
    sessions_deleted,
)
from api.turns import AWAITING, submitted_turn, wait_for_end
from shared import eventlog
from shared import events as ev
from shared.events import TerminalView
from shared.logs import bind
from shared.models import (
    CreateSession,
    SendMessage,
    Session,
    SessionWithMessages,
    check_metadata,
)
from shared.turns import IdemRecord

logger = logging.getLogger("sandstream.api")


class SessionController(Controller):
    path = "/api/v1"

    @post("/sandboxes/{sandbox_id:str}/sessions", status_code=201)
    async def create_session(self, request: Request[Any, Any, Any], sandbox_id: str) -> Session:
        svc = services_of(request)
        tenant = tenant_of(request)
        await owned_sandbox(svc, sandbox_id, tenant)
        body = await decode_body(request, CreateSession, empty_ok=True)
        if reason := check_metadata(body.metadata):
            raise Problem(422, "invalid_body", reason, field="$.metadata")
        idem = await claim_or_replay(
            request, svc, tenant, f"session:{sandbox_id}", await request.body()
        )
        if isinstance(idem, IdemRecord):
            return await owned_session(svc, idem.resource_id, tenant)
        agent = svc.settings.default_agent()
        if body.agent is not None:
            agent = body.agent.apply(agent)
        if agent.provider != "demo" and not agent.model:
            if idem is not None:
                await idem.abandon()
            raise Problem(
                422,
                "invalid_body",
                f"provider {agent.provider!r} needs a model: set agent.model",
                field="$.agent.model",
            )
        async with released_on_error(idem):
            return await svc.store.create_session(
                tenant,
                sandbox_id,
                body.metadata,
                agent,
                settles=idem.settlement() if idem is not None else None,
            )

    @get("/sandboxes/{sandbox_id:str}/sessions")
    async def list_sessions(
        self,
        request: Request[Any, Any, Any],
        sandbox_id: str,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Response[bytes]:
        svc = services_of(request)
        tenant = tenant_of(request)
        await owned_sandbox(svc, sandbox_id, tenant)
        try:
            page = await svc.store.list_sessions(
                sandbox_id, page_limit(limit, svc.settings), cursor
            )
        except LookupError:
            raise Problem(400, "invalid_cursor", "unknown cursor", field="cursor") from None
        sessions = await svc.store.get_sessions(page.ids, tenant)
        return paged_response(request, sessions, page.next_cursor)

    @get("/sessions/{sid:str}", opt={"scope": "read"})
    async def get_session(self, request: Request[Any, Any, Any], sid: str) -> SessionWithMessages:
        svc = services_of(request)
        session = await owned_session(svc, sid, tenant_of(request))
        messages = await svc.store.get_messages(sid)
        if session.state == "awaiting_approval" and (waiting := await svc.approvals.waiting(sid)):
            session.pending_approvals = waiting.pending
        return SessionWithMessages(**msgspec.structs.asdict(session), messages=messages)

    @delete("/sessions/{sid:str}", status_code=204)
    async def delete_session(self, request: Request[Any, Any, Any], sid: str) -> None:
        svc = services_of(request)
        session = await svc.store.delete_session(check_id("session", sid), tenant_of(request))
        if session is None:
            raise not_found("session", sid)
        await sessions_deleted(svc, [session])

    @post("/sessions/{sid:str}/messages", status_code=200, opt={"scope": "send"})
    async def send_message(
        self, request: Request[Any, Any, Any], sid: str, wait: float | None = None
    ) -> Response[bytes]:
        svc = services_of(request)
        check_id("session", sid)
        body = await decode_body(request, SendMessage, empty_ok=False)
        wait_limit = svc.settings.send_wait_seconds if wait is None else wait
        if not 0 <= wait_limit <= svc.settings.send_wait_seconds:
            raise Problem(
                400,
                "invalid_parameter",
                f"wait must be between 0 and {svc.settings.send_wait_seconds:g} seconds",
                field="wait",
            )
        idem = await claim_or_replay(
            request, svc, tenant_of(request), f"send:{sid}", await request.body()
        )
        if isinstance(idem, IdemRecord):
            return await _replay_send(request, svc, sid, idem, wait_limit)
        async with submitted_turn(
            svc, sid, tenant_of(request), list(body.content), idem, wait=wait_limit > 0
        ) as turn:
            bind(turn_id=turn.turn_id)
            logger.info("turn queued")
            terminal = None
            if turn.reply is not None:
                terminal = await wait_for_end(
                    svc, sid, turn.turn_id, turn.after, wait_limit, turn.reply
                )
        if terminal is None:
            return _accepted(request, sid, turn.turn_id, turn.after)
        if terminal is AWAITING:
            return await awaiting_reply(request, svc, sid, turn.turn_id, turn.after)
        return _turn_outcome(terminal)

    @post("/sessions/{sid:str}/interrupt", status_code=200, opt={"scope": "interrupt"})
    async def interrupt(self, request: Request[Any, Any, Any], sid: str) -> InterruptResult:
        svc = services_of(request)
        check_id("session", sid)
        seq = await eventlog.latest_seq(svc.redis, sid)
        state = await svc.store.turn_state(sid)
        if state is None or state.tenant != tenant_of(request):
            raise not_found("session", sid)
        if state.state != "running" or state.turn_id is None:
            return InterruptResult(session_id=sid, interrupted=False, state="active")
        turn_id = state.turn_id
        # A turn that waits, or whose continuation is queued, keeps its message so far.
        if not state.started and (
            await end_waiting_turn(svc, sid, state.sandbox_id, turn_id, awaiting=state.awaiting)
            or await svc.store.interrupt_unstarted(sid, state.sandbox_id, turn_id)
        ):
            return InterruptResult(
                session_id=sid, interrupted=True, turn_id=turn_id, state="active"
            )
        await svc.store.flag_interrupt(sid, turn_id)
        await publish_interrupt(svc, sid, turn_id)
        terminal = await wait_for_end(svc, sid, turn_id, seq, svc.settings.interrupt_wait_seconds)
        return InterruptResult(
            session_id=sid,
            interrupted=True,
            turn_id=turn_id,
            state="running" if terminal is None or terminal is AWAITING else "active",
        )


async def _replay_send(
    request: Request[Any, Any, Any], svc: Services, sid: str, first: IdemRecord, wait_limit: float
) -> Response[bytes]:
    """The outcome of the send that first used this Idempotency-Key."""
    turn_id = first.resource_id
    for message in await svc.store.get_messages(sid):
        if message.role == "assistant" and message.turn_id == turn_id:
            return Response(content=msgspec.json.encode(message), media_type="application/json")
    state = await svc.store.turn_state(sid)
    if state is not None and state.awaiting and state.turn_id == turn_id:
        return await awaiting_reply(request, svc, sid, turn_id, first.after)
    terminal = await wait_for_end(svc, sid, turn_id, first.after, wait_limit)
    if terminal is AWAITING:
        return await awaiting_reply(request, svc, sid, turn_id, first.after)
    if terminal is None:
        return _accepted(request, sid, turn_id, first.after)
    return _turn_outcome(terminal)


def _accepted(
    request: Request[Any, Any, Any], sid: str, turn_id: str, after: int
) -> Response[bytes]:
    body = TurnAccepted(
        session_id=sid,
        turn_id=turn_id,
        state="running",
        detail="the turn is still running; follow it on the stream or read the session",
        stream_url=absolute_url(request, f"/api/v1/sessions/{sid}/stream?after={after}"),
        session_url=absolute_url(request, f"/api/v1/sessions/{sid}"),
    )
    return Response(
        content=msgspec.json.encode(body),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/api/v1/sessions/{sid}"},
    )


def _turn_outcome(terminal: TerminalView) -> Response[bytes]:
    if terminal.type == "session_completed" and terminal.message is not None:
        return Response(
            content=msgspec.json.encode(terminal.message), media_type="application/json"
        )
    error = terminal.error or ev.ErrorInfo(code="turn_failed", message="the turn failed")
    raise Problem(
        502,
        "turn_failed",
        f"the turn failed: {error.message}",
        turn_id=terminal.turn_id,
        stop_reason=terminal.stop_reason,
        error=msgspec.to_builtins(error),
        message=msgspec.to_builtins(terminal.message),
    )
