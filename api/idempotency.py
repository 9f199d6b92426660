"""Idempotency-Key: a retried POST gets the first request's outcome, never a second one.

The first request with a key claims it in Redis (SET NX) as `pending` with a
digest of what it asks; once its effect is decided it records the resulting id
(`done`), or drops the claim if it failed (so a retry may try again). A retry
with the same key and body waits out a `pending` claim and replays `done`; the
same key with another body is a 422. Keys expire after `idempotency_seconds`;
a `pending` claim after `idempotency_pending_seconds`, since a request that
could not drop it (its process died, or the store went away as it failed) must
not keep every retry out for the key's whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from litestar import Request

from api.problems import Problem
from api.services import Services
from shared import keys

HEADER = "idempotency-key"
_PENDING_WAIT_SECONDS = 10.0
_POLL = 0.02


class IdemRecord(msgspec.Struct, kw_only=True):
    digest: str
    state: Literal["pending", "done"]
    resource_id: str = ""
    after: int = 0  # sends: the session's seq when the turn was claimed


_decoder = msgspec.json.Decoder(IdemRecord)


class IdemClaim:
    """The first request's hold on a key: settle it with the outcome, or abandon it."""

    def __init__(self, svc: Services, redis_key: str, digest: str) -> None:
        self._svc = svc
        self._key = redis_key
        self._digest = digest

    async def settle(self, resource_id: str, after: int = 0) -> None:
        record = IdemRecord(digest=self._digest, state="done", resource_id=resource_id, after=after)
        ttl = self._svc.settings.idempotency_seconds
        await self._svc.redis.set(self._key, msgspec.json.encode(record), ex=ttl)

    async def abandon(self) -> None:
        await self._svc.redis.delete(self._key)


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
    pending = msgspec.json.encode(IdemRecord(digest=digest, state="pending"))
    deadline = time.monotonic() + _PENDING_WAIT_SECONDS
    pending_ms = round(svc.settings.idempotency_pending_seconds * 1000)
    while True:
        if await svc.redis.set(redis_key, pending, nx=True, px=pending_ms):
            return IdemClaim(svc, redis_key, digest)
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
