"""Grants: what a browser may do with one session, without ever holding a tenant key.

A tenant's backend (holding the tenant key) mints, for one session:
- a **browser credential** (`ssb_…`, sent as `Authorization: Bearer`), whose
  scopes the backend picks among read, stream, send, interrupt and approve (the
  last only when asked for): what a page that shows one conversation needs, and
  nothing tenant-wide (no listing, no deletion, no other session). It lives
  `SANDSTREAM_GRANT_SECONDS` (1 h), or as long as the backend asks, up to
  `SANDSTREAM_GRANT_MAX_SECONDS`.
- a **stream token** (`sst_…`, passed as `?token=` since `EventSource` cannot
  send headers), which opens that one session's stream for reading and nothing
  else. A browser credential with the `stream` scope may mint one too, so the
  stronger credential never goes into a URL.

A stream token has two windows. For `SANDSTREAM_STREAM_TOKEN_SECONDS` (5 min)
its URL alone opens the stream. After that, until `SANDSTREAM_STREAM_GRANT_SECONDS`
(4 h), it only resumes it: the request must carry `Last-Event-ID`, as every
reconnect of an `EventSource` does (a stream opens with an `id:`, so even one
that dropped before its first event resumes with one). Why: `EventSource`
reconnects by itself, with the same URL, after every API restart, deploy or
network blip, and gives up for good on a 401, so a token that dies minutes after
the page loaded ends the page the first time its stream drops after that. Yet
tokens leak through URLs (history, logs, a pasted link), and a URL carries no
header: after its first minutes a leaked URL opens nothing, while the page that
holds the stream keeps it. Either way a stream token shows one session's events,
read-only, and an open stream ends when its grant does (`api.reconnect`).

A page renews before the end by minting a new token (through its backend or its
browser credential) and opening the stream again at `?after=<last seq>` before
closing the old one: seqs say exactly where it was, so nothing is lost or
repeated. A token minted by a browser credential never outlives it, so renewal
chains end where the backend's grant ends.

Redis holds only a token's SHA-256, with the grant's remaining life as TTL, so
any API replica can check a token and none can leak one.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
import weakref
from typing import Literal

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared import keys, scripts

Scope = Literal["read", "stream", "send", "interrupt", "approve"]
SCOPES: tuple[Scope, ...] = ("read", "stream", "send", "interrupt", "approve")
# What a page showing one conversation does, and what a grant gets unless its
# backend names scopes. `approve` (deciding tool calls that wait for a person)
# is given only when asked for: a page may show a session without being the
# person who lets its agent run commands. A stream token stays read-only.
DEFAULT_SCOPES: tuple[Scope, ...] = ("read", "stream", "send", "interrupt")
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
    key_id: str
    # seconds since the epoch: until when the token opens a stream by itself
    # (without Last-Event-ID), and until when it is good for anything
    opens_until: float
    expires_at: float

    def permits(self, sid: str | None, scope: str | None) -> bool:
        """Only its own session, and only what its scopes name."""
        return scope is not None and sid == self.session_id and scope in self.scopes

    def opens(self, resuming: bool) -> bool:
        """Whether it may open its stream now: any time while it lives when the
        request resumes one (Last-Event-ID), else only in its first window."""
        return resuming or time.time() < self.opens_until

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
    opening: float | None = None,
    not_after: float | None = None,
) -> tuple[str, Grant]:
    """A new token and its grant: good for `lifetime` seconds, opening its stream
    without a Last-Event-ID for the first `opening` (all of it when None), and
    never past `not_after` (a parent grant's end)."""
    now = time.time()
    end = now + lifetime if not_after is None else min(now + lifetime, not_after)
    token = TOKEN_PREFIX[kind] + secrets.token_urlsafe(32)
    grant = Grant(
        id=secrets.token_hex(8),
        kind=kind,
        tenant=tenant,
        session_id=session_id,
        scopes=scopes,
        key_id=key_id,
        opens_until=end if opening is None else min(now + opening, end),
        expires_at=end,
    )
    ttl_ms = max(1, int((end - now) * 1000))
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


# The budget script of each Redis client, registered once (a request does not
# hash the script again), loaded as the API starts (`scripts.load_registered`).
_COUNT_IN_WINDOW = scripts.load_at_start(scripts.COUNT_IN_WINDOW)
_counters: weakref.WeakKeyDictionary[Redis, AsyncScript] = weakref.WeakKeyDictionary()


async def count_in_window(redis: Redis, key: str) -> int:
    """One more use of a per-minute budget, counted in `key` (its window's
    counter, kept two minutes): the count so far, this one included."""
    script = _counters.get(redis)
    if script is None:
        script = _counters[redis] = redis.register_script(_COUNT_IN_WINDOW)
    return int(await script(keys=[key], args=[120]))


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
    count = await count_in_window(redis, keys.stream_connects(credential_id, int(now // 60)))
    if count <= per_minute:
        return None
    return int((60 - now % 60) * 1000) + random.randint(0, 5000)
