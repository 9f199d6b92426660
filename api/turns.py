"""The API's side of a turn: submit it, and wait for its end.

One waiting mechanism serves the blocking send, its idempotent replay and the
interrupt: a future from the hub (`EventHub.expect_reply`) that the turn's
terminal event resolves. A send names this process's reply channel in its
claim, so its wait costs no subscription; a wait on a turn someone else
submitted subscribes to the session's channel for its duration (with no
buffer: it needs only the terminal event, which the hub routes to the future).

Messages can be lost (a dropped connection to Redis), so at each keepalive
interval without an answer, and whenever the hub says messages may have been
missed, the wait reads the session's log from where it started: a lost message
costs time, never the reply. The deletion of the session ends the wait with 404
at once, and this process's shutdown ends it as "still running", so the client
follows the turn on the stream instead of getting an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from redis.exceptions import RedisError

from api.approvals import awaiting_problem
from api.hub import DELETED, DRAIN, RESYNC
from api.idempotency import IdemClaim, released_on_error
from api.problems import Problem, not_found
from api.services import Services
from shared import eventlog, keys
from shared.events import (
    APPROVAL_REQUESTED,
    APPROVAL_RESOLVED,
    TERMINAL_TYPES,
    TerminalView,
    decode_head,
    decode_terminal,
)
from shared.models import ContentBlock, Message, new_id, now_rfc3339
from shared.queue import TurnJob, queued_job

logger = logging.getLogger("sandstream.api")

# What a wait gives for a turn that began to wait for approval of tool calls
# (`shared.approvals`): the send answers 202 with the calls to decide.
AWAITING = TerminalView(seq=0, type=APPROVAL_REQUESTED, turn_id="", stop_reason="end_turn")


class _CallHead(msgspec.Struct):
    """Which turn's tool call an approval event is about."""

    turn_id: str | None = None
    tool_use_id: str = ""


_call_head = msgspec.json.Decoder(_CallHead)


class Submitted:
    """A turn claimed and queued; `reply` resolves when it ends (if asked for)."""

    def __init__(self, turn_id: str, after: int, reply: asyncio.Future[bytes] | None) -> None:
        self.turn_id = turn_id
        self.after = after  # the session's latest seq at the claim
        self.reply = reply


@contextlib.asynccontextmanager
async def submitted_turn(
    svc: Services,
    sid: str,
    tenant: str,
    content: list[ContentBlock],
    idem: IdemClaim | None,
    *,
    wait: bool,
) -> AsyncIterator[Submitted]:
    """Claim the session for a new turn with the user's message and queue it (a
    404 for no such session, a 409 naming the running turn); with `wait`, this
    process is told when it ends. The wait's registration ends with the block."""
    turn_id = new_id()
    user_message = Message(
        id=new_id(),
        session_id=sid,
        role="user",
        content=content,
        timestamp=now_rfc3339(),
        turn_id=turn_id,
    )
    # The worker publishes the turn's terminal event on this process's reply
    # channel as well (named in the claim): no per-send subscription.
    reply = svc.hub.expect_reply(sid, turn_id) if wait else None
    try:
        async with released_on_error(idem):
            claim = await svc.store.claim_turn(
                sid,
                tenant,
                turn_id,
                user_message,
                queued_job(TurnJob(session_id=sid, turn_id=turn_id)),
                reply_to=svc.hub.reply_channel if reply is not None else "",
                settles=idem.settlement() if idem is not None else None,
            )
        if idem is not None and claim.status != "ok":  # settled with the claim if it is
            await idem.abandon()
        if claim.status == "missing":
            raise not_found("session", sid)
        if claim.status == "running":
            state = await svc.store.turn_state(sid)
            if state is not None and state.awaiting and state.turn_id:
                raise awaiting_problem(sid, state.turn_id)
            raise Problem(
                409,
                "turn_in_progress",
                f"session {sid} is running turn {claim.turn_id}; wait for it or interrupt it",
                turn_id=claim.turn_id,
            )
        yield Submitted(turn_id, claim.latest_seq, reply)
    finally:
        if reply is not None:
            svc.hub.forget_reply(turn_id, reply)


async def wait_for_end(
    svc: Services,
    sid: str,
    turn_id: str,
    after: int,
    limit: float,
    reply: asyncio.Future[bytes] | None = None,
) -> TerminalView | None:
    """The turn's terminal event (AWAITING when it began to wait for approval);
    None when `limit` seconds pass first or this process is stopping. `after` is
    a seq from before the turn ended (the claim's, say); `reply` the future of a
    send's claim, if there is one.
    Raises 404 `session_not_found` when the session is deleted meanwhile."""
    if reply is not None:
        # Expected before the claim: the turn's end can only come after it, on
        # the reply channel (or a RESYNC says to read the log), so a send does
        # not read the log first.
        return await _wait(svc, sid, turn_id, after, limit, reply, check_log=False)
    async with svc.hub.subscribe(sid, buffer_bytes=0):
        reply = svc.hub.expect_reply(sid, turn_id)
        try:
            # Subscribed first, then the log: an end in between is in one of them.
            return await _wait(svc, sid, turn_id, after, limit, reply, check_log=True)
        finally:
            svc.hub.forget_reply(turn_id, reply)


async def _wait(
    svc: Services,
    sid: str,
    turn_id: str,
    after: int,
    limit: float,
    reply: asyncio.Future[bytes],
    *,
    check_log: bool,
) -> TerminalView | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    given = reply
    try:
        while True:
            if reply.done():
                data = reply.result()
                if data == DRAIN:
                    return None
                if data == DELETED:
                    raise not_found("session", sid)
                if data != RESYNC:
                    if decode_head(data).type == APPROVAL_REQUESTED:
                        return AWAITING
                    return decode_terminal(data)
                # Messages may have been missed: listen again, and read the log.
                svc.hub.forget_reply(turn_id, reply)
                reply = svc.hub.expect_reply(sid, turn_id)
                check_log = True
            if check_log:
                found, after = await _terminal_in_log(svc, sid, turn_id, after)
                if found is not None:
                    return found
                check_log = False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(
                    asyncio.shield(reply), min(remaining, svc.settings.keepalive_seconds)
                )
            except TimeoutError:
                check_log = True
    finally:
        # Listening again after a RESYNC registered a wait of its own, which is
        # this function's to forget (the caller forgets the one it gave).
        if reply is not given:
            svc.hub.forget_reply(turn_id, reply)


async def _still_awaiting(svc: Services, sid: str, turn_id: str) -> bool:
    """Whether the turn waits for approval now: a request in the log may have
    been decided since, and the turn gone on (a replayed send then waits for
    its end as any other)."""
    state = await svc.store.turn_state(sid)
    return state is not None and state.awaiting and state.turn_id == turn_id


async def _terminal_in_log(
    svc: Services, sid: str, turn_id: str, after: int
) -> tuple[TerminalView | None, int]:
    """The turn's terminal event if it is logged after `after` (else AWAITING if
    the turn began to wait for approval there and still waits: a call asked about
    and not decided); and how far the log was read, where the next look starts."""
    undecided: set[str] = set()
    try:
        while True:
            page = await eventlog.read_after(svc.redis, sid, after, 500)
            for logged in page:
                after = logged.seq
                if logged.type in TERMINAL_TYPES:
                    terminal = decode_terminal(logged.data)
                    if terminal.turn_id == turn_id:
                        return terminal, after
                elif logged.type in (APPROVAL_REQUESTED, APPROVAL_RESOLVED):
                    call = _call_head.decode(logged.data)
                    if call.turn_id != turn_id:
                        continue
                    if logged.type == APPROVAL_REQUESTED:
                        undecided.add(call.tool_use_id)
                    else:  # decided: once none is left, the turn runs on
                        undecided.discard(call.tool_use_id)
            if len(page) < 500:
                break
        if undecided and await _still_awaiting(svc, sid, turn_id):
            return AWAITING, after
        if not page and not await svc.redis.exists(keys.session(sid)):
            raise not_found("session", sid)
    except (RedisError, OSError):
        logger.warning("could not read the log of session %s", sid)
    return None, after
