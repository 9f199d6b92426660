"""Idempotency-Key: a retried POST gets the first request's outcome, never a second one.

The first request with a key claims it in Redis (SET NX) as `pending` with a
digest of what it asks; the write that makes its effect records the resulting
id (`done`) in the same step, or the request drops the claim if it failed (so a
retry may try again). A retry with the same key and body waits out a `pending`
claim and replays `done`; the same key with another body is a 422. Keys expire
after `idempotency_seconds`; a `pending` claim after
`idempotency_pending_seconds`, since a request that could not drop it (its
process died, or the store went away as it failed) must not keep every retry
out for the key's whole life.

A failure drops the record only while it is still `pending`: a request whose
reply from Redis was lost made its effect (the turn, the session, the
sandbox), and its retry replays that rather than making a second one or, for a
send, finding the session running (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request

from api.problems import Problem
from api.services import Services
from shared import keys
from shared.turns import IdemRecord, Settlement

HEADER = "idempotency-key"
_PENDING_WAIT_SECONDS = 10.0
_POLL = 0.02


_decoder = msgspec.json.Decoder(IdemRecord)


class IdemClaim:
    """The first request's hold on a key: settle it with the outcome, or abandon it."""

    def __init__(self, svc: Services, redis_key: str, digest: str, pending: bytes) -> None:
        self._svc = svc
        self._key = redis_key
        self._digest = digest
        self._pending = pending

    def settlement(self) -> Settlement:
        """The record for the write that makes the effect to settle in the same
        step: the effect and its record are stored together or not at all."""
        return Settlement(
            self._key, self._digest, self._svc.settings.idempotency_seconds, self._pending
        )

    async def abandon(self) -> None:
        """Let a retry try again (`SessionStore.drop_pending`)."""
        await self._svc.store.drop_pending(self.settlement())


@contextlib.asynccontextmanager
async def released_on_error(claim: IdemClaim | None) -> AsyncIterator[None]:
    """If the first request fails on the way, let a retry try again."""
    try:
        yield
    except BaseException:
        if claim is not None:
            with contextlib.suppress(Exception):
                await claim.abandon()
        raise


async def claim_or_replay(
    request: Request[Any, Any, Any],
    svc: Services,
    tenant: str,
    scope: str,
    body: bytes,
) -> IdemClaim | IdemRecord | None:
    """None without a key; an IdemClaim when this request goes first; else the
    settled record of the first request to replay."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise Problem(
            400,
            "invalid_parameter",
            "Idempotency-Key must be 1 to 255 printable characters",
            field="Idempotency-Key",
        )
    digest = hashlib.sha256(scope.encode() + b"\0" + body).hexdigest()
    redis_key = keys.idempotency(tenant, hashlib.sha256(key.encode()).hexdigest())
    pending = msgspec.json.encode(
        IdemRecord(digest=digest, state="pending", claim=uuid.uuid4().hex)
    )
    deadline = time.monotonic() + _PENDING_WAIT_SECONDS
    pending_ms = round(svc.settings.idempotency_pending_seconds * 1000)
    while True:
        if await svc.redis.set(redis_key, pending, nx=True, px=pending_ms):
            return IdemClaim(svc, redis_key, digest, pending)
        raw = await svc.redis.get(redis_key)
        if raw is None:
            continue  # the first request failed and let go: try to go first
        record = _decoder.decode(raw)
        if record.digest != digest:
            raise Problem(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request",
                field="Idempotency-Key",
            )
        if record.state == "done":
            return record
        if time.monotonic() > deadline:
            raise Problem(
                409, "idempotency_pending", "the first request with this key is still running"
            )
        await asyncio.sleep(_POLL)
