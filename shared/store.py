"""SessionStore: sandboxes, sessions, messages and the turn lifecycle in Redis.

The API and the workers share it; all multi-step writes go through the Lua
scripts of `shared.scripts`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis
from redis.exceptions import WatchError

from shared import keys, metrics, scripts
from shared.events import (
    Event,
    SessionCompleted,
    TerminalEvent,
    TextComplete,
    TextDelta,
    ToolResult,
    ToolUseComplete,
    ToolUseStart,
    encode_event,
)
from shared.metrics import TurnFigures
from shared.models import AgentConfig, Message, Sandbox, Session, new_id, now_rfc3339
from shared.queue import QueuedJob

FinishMode = Literal["worker", "unstarted", "orphaned"]

_message_decoder = msgspec.json.Decoder(Message)
_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


class SandboxRecord(Sandbox, kw_only=True):
    """A sandbox as stored: with the tenant that owns it and the uid its processes
    run as, which clients never see."""

    tenant: str
    uid: int | None = None  # None only for sandboxes made before uids were allocated

    def public(self) -> Sandbox:
        return Sandbox(**{f: getattr(self, f) for f in Sandbox.__struct_fields__})


_sandbox_decoder = msgspec.json.Decoder(SandboxRecord)
_agent_decoder = msgspec.json.Decoder(AgentConfig)


class ClaimResult(msgspec.Struct):
    status: Literal["ok", "running", "missing"]
    turn_id: str | None = None
    latest_seq: int = 0


class TurnState(msgspec.Struct, kw_only=True):
    sandbox_id: str
    tenant: str
    agent: AgentConfig | None
    state: str
    turn_id: str | None
    started: bool
    claimed_ms: int


# How long a bucket of turn outcomes (`/api/v1/ops/queues`) is kept.
_OUTCOME_TTL_SECONDS = 2 * 3600


class StartedTurn(msgspec.Struct, kw_only=True):
    sandbox_id: str
    agent: AgentConfig | None
    history: list[Message]  # the whole conversation, or its last message (START_TURN)


class TurnAppend(msgspec.Struct):
    """Events of one turn to append; `first`: the turn's first append (the log's
    expiry is set then)."""

    session_id: str
    turn_id: str
    events: list[Event]
    first: bool = False


_EVENT_TYPES = {
    cls: str(cls.__struct_config__.tag)
    for cls in (TextDelta, TextComplete, ToolUseStart, ToolUseComplete, ToolResult)
}


class Page(msgspec.Struct):
    ids: list[str]
    next_cursor: str | None


class SessionStore:
    def __init__(
        self,
        redis: Redis,
        *,
        log_max_events: int = 10_000,
        log_ttl_seconds: float = 604_800,
        sandbox_uid_base: int = 200_000,
    ) -> None:
        self.redis = redis
        self.sandbox_uid_base = sandbox_uid_base
        self.log_max_events = log_max_events
        # The log lives this long after its last event; a resume from before
        # what is left gets `log_truncated`, never a silent hole.
        self.log_ttl_ms = int(log_ttl_seconds * 1000)
        self._claim = redis.register_script(scripts.CLAIM_TURN)
        self._start = redis.register_script(scripts.START_TURN)
        self._renew = redis.register_script(scripts.RENEW_LEASE)
        self._append = redis.register_script(scripts.APPEND_EVENTS)
        self._finish = redis.register_script(scripts.FINISH_TURN)
        self._flag_interrupt = redis.register_script(scripts.FLAG_INTERRUPT)

    # ---- sandboxes ---------------------------------------------------------

    async def create_sandbox(
        self, tenant: str, metadata: dict[str, Any], network: bool = False
    ) -> Sandbox:
        now = now_rfc3339()
        record = SandboxRecord(
            id=new_id(),
            metadata=metadata,
            network=network,
            created_at=now,
            updated_at=now,
            tenant=tenant,
            uid=await self._new_uid(),
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.sandbox(record.id), msgspec.json.encode(record))
            pipe.zadd(keys.tenant_sandboxes(tenant), {record.id: time.time()})
            await pipe.execute()
        return record.public()

    async def get_sandbox(self, sandbox_id: str, tenant: str | None = None) -> Sandbox | None:
        """The sandbox, if it exists and (when a tenant is given) belongs to that tenant."""
        found = await self.get_sandboxes([sandbox_id], tenant)
        return found[0] if found else None

    async def get_sandboxes(self, ids: list[str], tenant: str | None = None) -> list[Sandbox]:
        if not ids:
            return []
        raws = await self.redis.mget([keys.sandbox(i) for i in ids])
        records = [_sandbox_decoder.decode(r) for r in raws if r is not None]
        return [r.public() for r in records if tenant is None or r.tenant == tenant]

    async def get_sandbox_record(self, sandbox_id: str) -> SandboxRecord | None:
        """The sandbox as stored, given a uid of its own if it had none yet."""
        key = keys.sandbox(sandbox_id)
        raw = await self.redis.get(key)
        if raw is None:
            return None
        record = _sandbox_decoder.decode(raw)
        if record.uid is not None:
            return record
        uid = await self._new_uid()
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                current = await pipe.get(key)
                if current is None:
                    return None
                record = _sandbox_decoder.decode(current)
                if record.uid is not None:  # another process gave it one first
                    return record
                record.uid = uid
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, msgspec.json.encode(record))
                await pipe.execute()
            except WatchError:
                return await self.get_sandbox_record(sandbox_id)
        return record

    async def _new_uid(self) -> int:
        """A uid no sandbox has had before (the counter never goes back)."""
        return self.sandbox_uid_base + int(await self.redis.incr(keys.SANDBOX_UIDS))

    async def list_sandboxes(self, tenant: str, limit: int, cursor: str | None) -> Page:
        return await self._page(keys.tenant_sandboxes(tenant), limit, cursor)

    async def delete_sandbox(self, sandbox_id: str, tenant: str) -> list[Session]:
        """Delete the sandbox and its sessions; returns the sessions deleted."""
        index = keys.sandbox_sessions(sandbox_id)
        deleted = []
        for sid in [s.decode() for s in await self.redis.zrange(index, 0, -1)]:
            session = await self.delete_session(sid)
            if session is not None:
                deleted.append(session)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.sandbox(sandbox_id), index)
            pipe.zrem(keys.tenant_sandboxes(tenant), sandbox_id)
            await pipe.execute()
        return deleted

    # ---- sessions ----------------------------------------------------------

    async def create_session(
        self, tenant: str, sandbox_id: str, metadata: dict[str, Any], agent: AgentConfig
    ) -> Session:
        now = now_rfc3339()
        sid = new_id()
        record = {
            "id": sid,
            "tenant": tenant,
            "sandbox_id": sandbox_id,
            "state": "active",
            "metadata": msgspec.json.encode(metadata),
            "agent": msgspec.json.encode(agent),
            # What START_TURN loads: the whole conversation, or the last message.
            "history": "all" if agent.reads_history else "last",
            "created_at": now,
            "updated_at": now,
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.session(sid), mapping=record)
            pipe.zadd(keys.sandbox_sessions(sandbox_id), {sid: time.time()})
            await pipe.execute()
        return Session(
            id=sid,
            sandbox_id=sandbox_id,
            state="active",
            metadata=metadata,
            created_at=now,
            updated_at=now,
            agent=agent,
        )

    async def get_session(self, sid: str, tenant: str | None = None) -> Session | None:
        """The session, if it exists and (when a tenant is given) belongs to that tenant."""
        found = await self.get_sessions([sid], tenant)
        return found[0] if found else None

    async def get_sessions(self, sids: list[str], tenant: str | None = None) -> list[Session]:
        fields = [
            "id",
            "sandbox_id",
            "state",
            "metadata",
            "created_at",
            "updated_at",
            "turn_id",
            "agent",
            "tenant",
        ]
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(keys.session(sid), fields)
            rows = await pipe.execute()
        sessions = []
        for row in rows:
            if row[0] is None or (tenant is not None and row[8] != tenant.encode()):
                continue
            turn_id = row[6].decode() if row[6] else None
            sessions.append(
                Session(
                    id=row[0].decode(),
                    sandbox_id=row[1].decode(),
                    state="running" if row[2] == b"running" else "active",
                    metadata=_metadata_decoder.decode(row[3]),
                    created_at=row[4].decode(),
                    updated_at=row[5].decode(),
                    turn_id=turn_id,
                    agent=_agent_decoder.decode(row[7]) if row[7] else None,
                )
            )
        return sessions

    async def list_sessions(self, sandbox_id: str, limit: int, cursor: str | None) -> Page:
        return await self._page(keys.sandbox_sessions(sandbox_id), limit, cursor)

    async def get_messages(self, sid: str) -> list[Message]:
        raws = await self.redis.lrange(keys.messages(sid), 0, -1)  # type: ignore[misc]
        return [_message_decoder.decode(r) for r in raws]

    async def delete_session(self, sid: str, tenant: str | None = None) -> Session | None:
        """Delete the session and everything in it; returns it as it was."""
        session = await self.get_session(sid, tenant)
        if session is None:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(*keys.session_keys(sid))
            pipe.zrem(keys.sandbox_sessions(session.sandbox_id), sid)
            pipe.srem(keys.RUNNING, sid)
            await pipe.execute()
        return session

    async def _page(self, index_key: str, limit: int, cursor: str | None) -> Page:
        """Page through a creation-ordered index; the cursor is the last id seen."""
        start = 0
        if cursor is not None:
            rank = await self.redis.zrank(index_key, cursor)
            if rank is None:
                raise LookupError("cursor")
            start = rank + 1
        ids = [i.decode() for i in await self.redis.zrange(index_key, start, start + limit)]
        more = len(ids) > limit
        ids = ids[:limit]
        return Page(ids=ids, next_cursor=ids[-1] if more and ids else None)

    # ---- the turn ----------------------------------------------------------

    async def claim_turn(
        self,
        sid: str,
        tenant: str,
        turn_id: str,
        user_message: Message,
        job: QueuedJob | None = None,
        reply_to: str = "",
    ) -> ClaimResult:
        """Make the session the tenant's new turn's, storing the user message, and
        queue `job` (the turn's) in the same step. `reply_to`: a pub/sub channel
        to publish the turn's terminal event on, besides the session's."""
        now = now_rfc3339()
        claim_keys = [keys.session(sid), keys.messages(sid), keys.seq(sid)]
        args: list[str | bytes | int] = [
            turn_id,
            msgspec.json.encode(user_message),
            now,
            int(time.time() * 1000),
            tenant,
        ]
        if job is not None:
            claim_keys += job.keys()
            args += [*job.args(), reply_to]
        res = await self._claim(keys=claim_keys, args=args)
        status = res[0].decode()
        if status == "ok":
            return ClaimResult("ok", turn_id, int(res[1]))
        if status == "running":
            return ClaimResult("running", res[1].decode())
        return ClaimResult("missing")

    async def turn_state(self, sid: str) -> TurnState | None:
        row = await self.redis.hmget(  # type: ignore[misc]
            keys.session(sid),
            ["sandbox_id", "state", "turn_id", "started", "claimed_ms", "agent", "tenant"],
        )
        if row[0] is None:
            return None
        return TurnState(
            sandbox_id=row[0].decode(),
            state=row[1].decode(),
            turn_id=row[2].decode() if row[2] else None,
            started=row[3] is not None,
            claimed_ms=int(row[4] or 0),
            agent=_agent_decoder.decode(row[5]) if row[5] else None,
            tenant=(row[6] or b"").decode(),
        )

    async def start_turn(
        self, sid: str, turn_id: str, worker_id: str, lease_ms: int
    ) -> StartedTurn | None:
        """Take the turn and its lease; None when it is not this job's to run."""
        res = await self._start(
            keys=[keys.session(sid), keys.lease(sid), keys.messages(sid), keys.METRICS_COUNTERS],
            args=[turn_id, worker_id, lease_ms, metrics.STARTED],
        )
        if not res:
            return None
        return StartedTurn(
            sandbox_id=res[0].decode(),
            agent=_agent_decoder.decode(res[1]) if res[1] else None,
            history=[_message_decoder.decode(m) for m in res[2]],
        )

    async def renew_lease(self, sid: str, turn_id: str, worker_id: str, lease_ms: int) -> int:
        return int(
            await self._renew(
                keys=[keys.session(sid), keys.lease(sid)], args=[turn_id, worker_id, lease_ms]
            )
        )

    async def flag_interrupt(self, sid: str, turn_id: str) -> bool:
        return bool(await self._flag_interrupt(keys=[keys.session(sid)], args=[turn_id]))

    async def append_events(self, sid: str, turn_id: str, events: list[Event]) -> list[int]:
        """Append one turn's events in order, in one script call: each gets its
        seq, or every one 0 when the turn is no longer current (and none is
        appended)."""
        if not events:
            return []
        [first] = await self.append_batch([TurnAppend(sid, turn_id, events, first=True)])
        return list(range(first, first + len(events))) if first else [0] * len(events)

    async def append_batch(self, turns: list[TurnAppend]) -> list[int]:
        """Append the events of several turns (each with at least one event, each
        turn once) in one script call; per turn, the seq of its first event, or 0
        when it is no longer current (none of its events appended)."""
        if not turns:
            return []
        script_keys: list[str] = []
        args: list[int | str | bytes] = [self.log_max_events, self.log_ttl_ms]
        for turn in turns:
            sid = turn.session_id
            script_keys += [keys.session(sid), keys.seq(sid), keys.log(sid)]
            args += [
                turn.turn_id,
                keys.events_channel(sid),
                "1" if turn.first else "",
                len(turn.events),
            ]
            for event in turn.events:
                args.append(_EVENT_TYPES[type(event)])
                # A copy, not a memoryview: redis-py sends each memoryview as a
                # buffer of its own, and the packed call as one.
                args.append(encode_event(event)[1:])
        return [int(first) for first in await self._append(keys=script_keys, args=args)]

    async def finish_turn(
        self,
        sid: str,
        turn_id: str,
        mode: FinishMode,
        message: Message | None,
        terminal: TerminalEvent,
        figures: TurnFigures | None = None,
        events: list[Event] | None = None,
    ) -> int:
        """In one step: append `events` (the turn's last, not yet sent) and then the
        terminal event, store the message, free the session, and count the turn
        for ops and metrics (`figures`: what the turn measured, if it ran)."""
        figures = figures or TurnFigures()
        result, reason = (
            ("completed", str(terminal.stop_reason))
            if isinstance(terminal, SessionCompleted)
            else ("failed", terminal.error.code)
        )
        bucket = keys.turn_outcomes(int(time.time()) // keys.STATS_BUCKET_SECONDS)
        outcome = f"{terminal.__struct_config__.tag}:{terminal.stop_reason}"
        counters = [(bucket, outcome, 1), *metrics.increments(result, reason, figures)]
        duration = figures.duration_seconds
        script_keys = [
            keys.session(sid),
            keys.messages(sid),
            keys.seq(sid),
            keys.log(sid),
            keys.lease(sid),
            keys.RUNNING,
            keys.TURN_DURATIONS,
        ]
        args: list[Any] = [
            turn_id,
            mode,
            b"" if message is None else msgspec.json.encode(message),
            encode_event(terminal),
            str(terminal.__struct_config__.tag),
            self.log_max_events,
            keys.events_channel(sid),
            now_rfc3339(),
            self.log_ttl_ms,
            sid,
            "" if duration is None else round(duration * 1000),
            len(events or []),
        ]
        for event in events or []:
            args += [str(event.__struct_config__.tag), encode_event(event)]
        for key, field, increment in counters:
            if key not in script_keys:
                script_keys.append(key)
            ttl = _OUTCOME_TTL_SECONDS if key == bucket else 0
            args += [script_keys.index(key) + 1, field, increment, ttl]
        return int(await self._finish(keys=script_keys, args=args))

    async def running_count(self) -> int:
        return int(await self.redis.scard(keys.RUNNING))  # type: ignore[misc]

    async def running_sessions(self) -> list[str]:
        return [s.decode() for s in await self.redis.smembers(keys.RUNNING)]  # type: ignore[misc]

    async def forget_running(self, sid: str) -> None:
        await self.redis.srem(keys.RUNNING, sid)  # type: ignore[misc]
