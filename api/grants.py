"""Grants: what a browser may do with one session, without ever holding a tenant key.

A tenant's backend (holding the tenant key) mints, for one session:
- a **browser credential** (`ssb_…`, sent as `Authorization: Bearer`), whose
  scopes the backend picks among read, stream, send and interrupt: what a page
  that shows one conversation needs, and nothing tenant-wide (no listing, no
  deletion, no other session);
- a **stream token** (`sst_…`, passed as `?token=` since `EventSource` cannot
  send headers), which opens that one session's stream for reading and nothing
  else. A browser credential with the `stream` scope may mint one too, so the
  stronger credential never goes into a URL.

Why a stream token lives for hours (`SANDSTREAM_STREAM_TOKEN_SECONDS`, 4 h by
default): `EventSource` reconnects by itself, with the same URL and a
`Last-Event-ID`, after every API restart, deploy or network blip, and gives up
for good on a 401. A token that dies minutes after the page loaded ends the
page the first time its stream drops after that. What a leaked stream token
gives is a read-only view of one session until it expires, so it can live long;
a browser credential can run commands (`send`), so its default life is shorter
(`SANDSTREAM_GRANT_SECONDS`). A page renews by minting a new token and opening
the stream again at `?after=<last seq>` before closing the old one: seqs say
exactly where it was, so nothing is lost or repeated. A token minted by a
browser credential never outlives it, so renewal chains end where the
backend's grant ends.

Redis holds only a token's SHA-256, with the grant's remaining life as TTL, so
any API replica can check a token and none can leak one.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from typing import Literal

import msgspec
from redis.asyncio import Redis

from shared import keys

Scope = Literal["read", "stream", "send", "interrupt"]
# What a page showing one conversation does; a new per-session action (deciding
# a tool call's approval, say) is one more scope here and on its route's `opt`.
SCOPES: tuple[Scope, ...] = ("read", "stream", "send", "interrupt")
Kind = Literal["browser", "stream"]
TOKEN_PREFIX: dict[Kind, str] = {"browser": "ssb_", "stream": "sst_"}


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What one token allows. `id` names the grant in budgets and logs (never
    the token); `key_id` is the tenant key that minted it, directly or not."""

    id: str
    kind: Kind
    tenant: str
    session_id: str
    scopes: tuple[Scope, ...]
    expires_at: float  # seconds since the epoch
    key_id: str

    def permits(self, sid: str | None, scope: str | None) -> bool:
        """Only its own session, and only what its scopes name."""
        return scope is not None and sid == self.session_id and scope in self.scopes

    def seconds_left(self) -> float:
        return self.expires_at - time.time()


_decoder = msgspec.json.Decoder(Grant)


async def mint(
    redis: Redis,
    *,
    kind: Kind,
    tenant: str,
    session_id: str,
    scopes: tuple[Scope, ...],
    key_id: str,
    lifetime: float,
    not_after: float | None = None,
) -> tuple[str, Grant]:
    """A new token and its grant; `not_after` caps it (a parent grant's end)."""
    now = time.time()
    expires_at = now + lifetime if not_after is None else min(now + lifetime, not_after)
    token = TOKEN_PREFIX[kind] + secrets.token_urlsafe(32)
    grant = Grant(
        id=secrets.token_hex(8),
        kind=kind,
        tenant=tenant,
        session_id=session_id,
        scopes=scopes,
        expires_at=expires_at,
        key_id=key_id,
    )
    ttl_ms = max(1, int((expires_at - now) * 1000))
    await redis.set(keys.grant(_digest(token)), msgspec.json.encode(grant), px=ttl_ms)
    return token, grant


async def redeem(redis: Redis, token: str, kind: Kind) -> Grant | None:
    """The grant of a live token of that kind; None for anything else."""
    if not token.startswith(TOKEN_PREFIX[kind]):
        return None
    raw = await redis.get(keys.grant(_digest(token)))
    if raw is None:
        return None
    grant = _decoder.decode(raw)
    if grant.kind != kind or grant.seconds_left() <= 0:
        return None
    return grant


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def admit_stream(redis: Redis, credential_id: str, per_minute: int) -> int | None:
    """Count one stream (re)connection of a key or grant; None while within
    `per_minute`, else how long (ms) the client should wait before coming back.

    Stream connections have a budget of their own, apart from the REST one: a
    page reconnecting must not use up its backend's requests, nor be refused
    because the backend used them. And past the budget the answer is never a
    429, on which `EventSource` gives up for good: the stream route opens and
    ends at once with a `retry:` hint reaching past the window (plus jitter, so
    a throttled crowd does not come back in step). A reconnect storm after a
    deploy is one connection per page, well within each page's own budget.
    """
    if per_minute <= 0:
        return None
    now = time.time()
    window = int(now // 60)
    key = keys.stream_connects(credential_id, window)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = await pipe.execute()
    if count <= per_minute:
        return None
    return int((60 - now % 60) * 1000) + random.randint(0, 5000)
