"""Approvals: which tool calls wait for a person, and turns suspended in Redis meanwhile.

A person may answer in a second or in an hour, so a turn that waits holds
nothing: its worker writes what the turn has so far (the assistant message's
blocks, the model response's tool calls and what each will do) and leaves the
job. The session stays `running` inside (so a claim still answers 409 and the
end-of-turn script still applies) with an `awaiting` mark that clients see as
`awaiting_approval`; it leaves the running index, so the reaper, which ends
turns whose worker is gone, never takes a waiting turn for a lost one.

Each decision is one script: it records the decision and appends its event,
and the one that leaves nothing pending also queues a continuation job, which
any worker picks up like a new turn. Undecided calls are denied when they time
out by a pass of every worker's reaper over a deadline index: a deadline that
passed while no process ran is acted on by the first worker to start.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

from shared import events as ev
from shared import keys, scripts
from shared.models import ContentBlock, PendingApproval, Verdict, new_id, now_rfc3339
from shared.queue import TURN_FUNCTION, TurnJob, serialize_job_data
from shared.scripts import APPEND_ALL

DecidedBy = str
TIMEOUT_REASON = "timed out"

# ---- records --------------------------------------------------------------


class CallPlan(msgspec.Struct, kw_only=True):
    """One tool call of the model's response and what the turn does with it."""

    index: int
    verdict: Verdict
    reason: str = ""


class SuspendedTurn(msgspec.Struct, kw_only=True):
    """What a waiting turn's worker left: enough for any worker to go on."""

    turn_id: str
    message_id: str
    iteration: int
    blocks: list[ContentBlock]
    usage: ev.Usage
    calls: list[CallPlan]


class Resolution(msgspec.Struct, kw_only=True):
    decision: Literal["allow", "deny"]
    reason: str
    decided_by: DecidedBy
    decided_at: str


_suspended_decoder = msgspec.json.Decoder(SuspendedTurn)
_pending_decoder = msgspec.json.Decoder(PendingApproval)
_resolution_decoder = msgspec.json.Decoder(Resolution)
_encoder = msgspec.json.Encoder()
# The approvals hash: the waiting message's and turn's ids, and per call (field
# `call:` + its id: the model names calls, and may name one `turn_id`) `?` + the
# pending approval or `=` + its resolution (scripts tell them apart by that
# character). Decisions stay after the turn goes on, until the session's next
# wait: a decision sent again, or racing another, is answered from them.
MESSAGE_FIELD = "message_id"
TURN_FIELD = "turn_id"
CALL = "call:"


def _call_id(field: bytes) -> str:
    return field.decode().removeprefix(CALL)


PENDING, DECIDED = b"?", b"="


def denial_text(resolution: Resolution) -> str:
    """The tool result the model reads for a call a person (or the clock) denied."""
    if resolution.reason == TIMEOUT_REASON:
        return "[denied: the approval timed out] the tool did not run"
    reason = f": {resolution.reason}" if resolution.reason else ""
    return f"[denied by the user{reason}] the tool did not run"


# ---- scripts --------------------------------------------------------------

# KEYS: session, seq, log, suspended, approvals, running index, deadlines, appended.
# ARGV[1]: msgpack of SuspendArgs.
# -> 1 suspended (by this call, or by the same call sent before whose reply was
#    lost) | 0 the turn is not this worker's any more | 2 an interrupt of the
#    turn is asked for (nothing written either way: the turn ends interrupted)
# The turn's last events, its record and its leaving the running index and the
# worker are one step; the blocking send that waits for it (reply_to) hears of
# the last event, and answers that the turn waits.
SUSPEND = (
    APPEND_ALL
    + """
local a = cmsgpack.unpack(ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'turn_id') ~= a.turn_id then
  return 0
end
local started = redis.call('HGET', KEYS[1], 'started')
if started ~= a.worker_id then
  if not started and redis.call('HGET', KEYS[1], 'awaiting') == a.turn_id
     and redis.call('GET', KEYS[4]) == a.record then
    return 1
  end
  return 0
end
if redis.call('HGET', KEYS[1], 'interrupt') == a.turn_id then return 2 end
redis.call('HSET', KEYS[1], 'awaiting', a.turn_id, 'updated_at', a.now)
redis.call('HDEL', KEYS[1], 'started', 'lease_epoch')
-- the resumed turn's writer counts its appends from none
redis.call('DEL', KEYS[5], KEYS[8])
redis.call('SET', KEYS[4], a.record)
redis.call('HSET', KEYS[5], 'message_id', a.message_id, 'turn_id', a.turn_id)
for _, p in ipairs(a.pending) do redis.call('HSET', KEYS[5], p[1], p[2]) end
redis.call('SREM', KEYS[6], a.session_id)
redis.call('ZADD', KEYS[7], a.deadline_ms, a.session_id)
local last = append_all(a.events, KEYS[2], KEYS[3], a.maxlen, a.ttl_ms, a.channel)
local reply_to = redis.call('HGET', KEYS[1], 'reply_to')
if reply_to and last then redis.call('PUBLISH', reply_to, last) end
return 1
"""
)

# KEYS: session, approvals, seq, log, job, queue, running index, deadlines.
# ARGV[1]: msgpack of ResolveArgs; ARGV[2]: the continuation job's arq payload.
# -> {'missing'} no such waiting call (or not the tenant's) | {'decided', stored}
#    (mode decide: decided before) | {'early'} (mode expire: not due) |
#    {'waiting'} calls still pending | {'resumed'} the continuation is queued
# mode "decide": one call, by a person. mode "expire": every call still pending,
# denied because its deadline passed.
RESOLVE = (
    APPEND_ALL
    + """
local a = cmsgpack.unpack(ARGV[1])
if a.tenant ~= '' and redis.call('HGET', KEYS[1], 'tenant') ~= a.tenant then
  return {'missing'}
end
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'turn_id') ~= a.turn_id
   or redis.call('HGET', KEYS[1], 'awaiting') ~= a.turn_id then
  return {'missing'}
end
if a.mode == 'expire' then
  local due = redis.call('ZSCORE', KEYS[8], a.session_id)
  if due and tonumber(due) > a.now_ms then return {'early'} end
end
local events = {}
for _, d in ipairs(a.decisions) do
  local stored = redis.call('HGET', KEYS[2], d[1])
  if a.mode == 'decide' then
    if not stored then return {'missing'} end
    if string.sub(stored, 1, 1) == '=' then return {'decided', stored} end
  end
  if stored and string.sub(stored, 1, 1) == '?' then
    redis.call('HSET', KEYS[2], d[1], d[2])
    events[#events + 1] = {'tool_approval_resolved', d[3]}
  end
end
append_all(events, KEYS[3], KEYS[4], a.maxlen, a.ttl_ms, a.channel)
redis.call('HSET', KEYS[1], 'updated_at', a.now)
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  if string.sub(v, 1, 1) == '?' then return {'waiting'} end
end
redis.call('HDEL', KEYS[1], 'awaiting', 'started')
redis.call('HSET', KEYS[1], 'claimed_ms', a.now_ms, 'job_id', a.job_id)
redis.call('SADD', KEYS[7], a.session_id)
redis.call('ZREM', KEYS[8], a.session_id)
redis.call('PSETEX', KEYS[5], a.job_expiry_ms, ARGV[2])
redis.call('ZADD', KEYS[6], a.now_ms, a.job_id)
redis.call('PUBLISH', a.wake_channel, a.job_id)
return {'resumed'}
"""
)


class _LogArgs(msgspec.Struct, kw_only=True):
    session_id: str
    turn_id: str
    now: str
    maxlen: int
    ttl_ms: int
    channel: str


class SuspendArgs(_LogArgs, kw_only=True):
    worker_id: str
    message_id: str
    # JSON documents travel as text: Lua's msgpack reads no binary type.
    record: str
    pending: list[tuple[str, str]]
    events: list[tuple[str, str]]  # (type, JSON without seq and its opening brace)
    deadline_ms: int


class ResolveArgs(_LogArgs, kw_only=True):
    tenant: str
    mode: Literal["decide", "expire"]
    now_ms: int
    # (the call's field, stored value, event JSON without seq and its opening brace)
    decisions: list[tuple[str, str, str]]
    job_id: str
    job_expiry_ms: int
    wake_channel: str


ResolveOutcome = Literal["missing", "decided", "early", "waiting", "resumed"]


class Waiting(msgspec.Struct, kw_only=True):
    """A session's waiting turn as the API reads it: None of it when not waiting."""

    turn_id: str
    sandbox_id: str
    message_id: str
    pending: list[PendingApproval]
    decided: dict[str, Resolution]


# ---- the store ------------------------------------------------------------


class ApprovalStore:
    def __init__(self, redis: Redis, *, log_max_events: int, log_ttl_seconds: float) -> None:
        self.redis = redis
        self.log_max_events = log_max_events
        self.log_ttl_ms = int(log_ttl_seconds * 1000)
        self._suspend = scripts.register(redis, SUSPEND)
        self._resolve = scripts.register(redis, RESOLVE)

    def _log_args(self, sid: str, turn_id: str) -> dict[str, Any]:
        return {
            "session_id": sid,
            "turn_id": turn_id,
            "now": now_rfc3339(),
            "maxlen": self.log_max_events,
            "ttl_ms": self.log_ttl_ms,
            "channel": keys.LIVE_CHANNEL,
        }

    async def suspend(
        self,
        *,
        sid: str,
        worker_id: str,
        record: SuspendedTurn,
        pending: list[PendingApproval],
        events: list[ev.Event],
        deadline: float,
    ) -> int:
        """Leave the turn waiting for `pending`, after appending `events` (the
        turn's unsent ones, then the requests): 1. 0 when it is not ours, 2
        when an interrupt of it is asked for (nothing is written then)."""
        args = SuspendArgs(
            **self._log_args(sid, record.turn_id),
            worker_id=worker_id,
            message_id=record.message_id,
            record=_encoder.encode(record).decode(),
            pending=[
                (CALL + p.tool_use_id, (PENDING + _encoder.encode(p)).decode()) for p in pending
            ],
            events=[
                (str(e.__struct_config__.tag), ev.encode_event(e)[1:].decode()) for e in events
            ],
            deadline_ms=int(deadline * 1000),
        )
        script_keys = [
            keys.session(sid),
            keys.seq(sid),
            keys.log(sid),
            keys.suspended(sid),
            keys.approvals(sid),
            keys.RUNNING,
            keys.APPROVAL_DEADLINES,
            keys.appended(sid),
        ]
        return int(await self._suspend(keys=script_keys, args=[msgspec.msgpack.encode(args)]))

    async def waiting(self, sid: str) -> Waiting | None:
        """The session's waiting turn and its calls, or None when none waits."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.session(sid), ["state", "turn_id", "awaiting", "sandbox_id"])
            pipe.hgetall(keys.approvals(sid))
            row, stored = await pipe.execute()
        if row[0] != b"running" or not row[1] or row[2] != row[1]:
            return None
        pending, decided = [], {}
        for field, value in stored.items():
            if value[:1] == PENDING:
                pending.append(_pending_decoder.decode(value[1:]))
            elif value[:1] == DECIDED:
                decided[_call_id(field)] = _resolution_decoder.decode(value[1:])
        pending.sort(key=lambda p: p.index)
        return Waiting(
            turn_id=row[1].decode(),
            sandbox_id=row[3].decode(),
            message_id=(stored.get(MESSAGE_FIELD.encode()) or b"").decode(),
            pending=pending,
            decided=decided,
        )

    async def resolve(
        self,
        *,
        sid: str,
        tenant: str,
        waiting: Waiting,
        mode: Literal["decide", "expire"],
        decisions: list[tuple[PendingApproval, Resolution]],
    ) -> tuple[ResolveOutcome, Resolution | None]:
        """Record decisions; the one that leaves none pending queues the
        continuation. For a decision made before: ('decided', what it was)."""
        job_id = f"{waiting.turn_id}:{new_id()[:8]}"
        now_ms = int(time.time() * 1000)
        payload = serialize_job(
            TURN_FUNCTION,
            (msgspec.to_builtins(TurnJob(session_id=sid, turn_id=waiting.turn_id, resumes=True)),),
            {},
            None,
            now_ms,
            serializer=serialize_job_data,
        )
        rows = []
        for call, resolution in decisions:
            event = ev.ToolApprovalResolved(
                session_id=sid,
                sandbox_id=waiting.sandbox_id,
                turn_id=waiting.turn_id,
                message_id=waiting.message_id,
                created_at=now_rfc3339(),
                index=call.index,
                tool_use_id=call.tool_use_id,
                decision=resolution.decision,
                reason=resolution.reason,
                decided_by=resolution.decided_by,
            )
            stored = (DECIDED + _encoder.encode(resolution)).decode()
            rows.append((CALL + call.tool_use_id, stored, ev.encode_event(event)[1:].decode()))
        args = ResolveArgs(
            **self._log_args(sid, waiting.turn_id),
            tenant=tenant,
            mode=mode,
            now_ms=now_ms,
            decisions=rows,
            job_id=job_id,
            job_expiry_ms=expires_extra_ms,
            wake_channel=keys.WAKE_CHANNEL,
        )
        script_keys = [
            keys.session(sid),
            keys.approvals(sid),
            keys.seq(sid),
            keys.log(sid),
            job_key_prefix + job_id,
            keys.QUEUE,
            keys.RUNNING,
            keys.APPROVAL_DEADLINES,
        ]
        res = await self._resolve(keys=script_keys, args=[msgspec.msgpack.encode(args), payload])
        outcome: ResolveOutcome = res[0].decode()
        before = _resolution_decoder.decode(res[1][1:]) if outcome == "decided" else None
        return outcome, before

    async def expire_overdue(self, now: float | None = None, limit: int = 100) -> int:
        """Deny, as timed out, every call whose deadline has passed; the turns
        go on. Returns how many turns were resumed."""
        now = time.time() if now is None else now
        due = await self.redis.zrangebyscore(
            keys.APPROVAL_DEADLINES, "-inf", int(now * 1000), start=0, num=limit
        )
        resumed = 0
        for raw in due:
            sid = raw.decode()
            waiting = await self.waiting(sid)
            if waiting is None:
                await self.redis.zrem(keys.APPROVAL_DEADLINES, sid)
                continue
            timed_out = Resolution(
                decision="deny",
                reason=TIMEOUT_REASON,
                decided_by="timeout",
                decided_at=now_rfc3339(),
            )
            outcome, _ = await self.resolve(
                sid=sid,
                tenant="",
                waiting=waiting,
                mode="expire",
                decisions=[(call, timed_out) for call in waiting.pending],
            )
            resumed += outcome == "resumed"
        return resumed

    async def decision(self, sid: str, tool_use_id: str) -> tuple[str, Resolution] | None:
        """A call's recorded decision and its turn, also after the turn went on
        (until the session's next wait); None when it was never decided."""
        stored, turn_id = await self.redis.hmget(  # type: ignore[misc]
            keys.approvals(sid), [CALL + tool_use_id, TURN_FIELD]
        )
        if stored is None or stored[:1] != DECIDED or turn_id is None:
            return None
        return turn_id.decode(), _resolution_decoder.decode(stored[1:])

    async def take_suspended(
        self, sid: str, turn_id: str
    ) -> tuple[SuspendedTurn, dict[str, Resolution]] | None:
        """A resumed turn's record and decisions, or None when the turn never waited."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.suspended(sid))
            pipe.hgetall(keys.approvals(sid))
            raw, stored = await pipe.execute()
        if raw is None:
            return None
        record = _suspended_decoder.decode(raw)
        if record.turn_id != turn_id:
            return None
        decided = {
            _call_id(field): _resolution_decoder.decode(value[1:])
            for field, value in stored.items()
            if value[:1] == DECIDED
        }
        return record, decided

    async def forget(self, sid: str) -> None:
        """Drop a waiting turn's record once it is resumed or ended."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.suspended(sid))
            pipe.zrem(keys.APPROVAL_DEADLINES, sid)
            await pipe.execute()

    async def suspended_record(self, sid: str, turn_id: str) -> SuspendedTurn | None:
        raw = await self.redis.get(keys.suspended(sid))
        if raw is None:
            return None
        record = _suspended_decoder.decode(raw)
        return record if record.turn_id == turn_id else None
