"""SessionStore: sandboxes, sessions and messages in Redis, and (from
`shared.turns`) the turn lifecycle.

The API and the workers share it; all multi-step writes go through the Lua
scripts of `shared.scripts`.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from shared import keys, scripts
from shared.models import (
    AgentConfig,
    Message,
    Sandbox,
    Session,
    SessionState,
    new_id,
    now_rfc3339,
)
from shared.turns import (
    ClaimResult,
    FinishMode,
    Settlement,
    StartedTurn,
    TurnAppend,
    TurnLifecycle,
    TurnState,
)

__all__ = [
    "ClaimResult",
    "FinishMode",
    "SandboxRecord",
    "SessionStore",
    "StartedTurn",
    "TurnAppend",
    "TurnState",
]

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


class Page(msgspec.Struct):
    ids: list[str]
    next_cursor: str | None


class SessionStore(TurnLifecycle):
    """Sandboxes, sessions and messages; the turn's steps come from `TurnLifecycle`."""

    def __init__(
        self,
        redis: Redis,
        *,
        log_max_events: int = 10_000,
        log_ttl_seconds: float = 604_800,
        sandbox_uid_base: int = 200_000,
    ) -> None:
        super().__init__(redis, log_max_events=log_max_events, log_ttl_seconds=log_ttl_seconds)
        self.sandbox_uid_base = sandbox_uid_base
        self._settle = scripts.register(redis, scripts.SETTLE)
        self._drop_pending = scripts.register(redis, scripts.DROP_PENDING)

    async def _settle_in(self, pipe: Pipeline, settles: Settlement, resource_id: str) -> None:
        """Queue the settling of an Idempotency-Key's record in `pipe`, the
        transaction that makes `resource_id` (SETTLE)."""
        await self._settle(
            keys=[settles.key],
            args=[settles.pending, settles.done(resource_id), settles.ttl_seconds],
            client=pipe,
        )

    async def drop_pending(self, settles: Settlement) -> bool:
        """Let a retry try again: drop an Idempotency-Key's record while it is still
        this request's `pending` one (a settled one stays: the effect happened)."""
        return bool(await self._drop_pending(keys=[settles.key], args=[settles.pending]))

    # ---- sandboxes ---------------------------------------------------------

    async def create_sandbox(
        self,
        tenant: str,
        metadata: dict[str, Any],
        network: bool = False,
        settles: Settlement | None = None,
    ) -> Sandbox:
        """A new sandbox; with `settles`, its Idempotency-Key's record is settled
        in the same transaction."""
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
        async with self.redis.pipeline(transaction=settles is not None) as pipe:
            pipe.set(keys.sandbox(record.id), msgspec.json.encode(record))
            pipe.zadd(keys.tenant_sandboxes(tenant), {record.id: time.time()})
            if settles is not None:
                await self._settle_in(pipe, settles, record.id)
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
        self,
        tenant: str,
        sandbox_id: str,
        metadata: dict[str, Any],
        agent: AgentConfig,
        settles: Settlement | None = None,
    ) -> Session:
        """A new session; with `settles`, its Idempotency-Key's record is settled
        in the same transaction."""
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
        async with self.redis.pipeline(transaction=settles is not None) as pipe:
            pipe.hset(keys.session(sid), mapping=record)
            pipe.zadd(keys.sandbox_sessions(sandbox_id), {sid: time.time()})
            if settles is not None:
                await self._settle_in(pipe, settles, sid)
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
            "awaiting",
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
            state: SessionState = "running" if row[2] == b"running" else "active"
            if state == "running" and row[9] is not None and row[9] == row[6]:
                state = "awaiting_approval"
            sessions.append(
                Session(
                    id=row[0].decode(),
                    sandbox_id=row[1].decode(),
                    state=state,
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
            pipe.zrem(keys.APPROVAL_DEADLINES, sid)
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
