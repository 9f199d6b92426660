"""The guard every route runs: who is asking, may they, and are they within their rate."""

from __future__ import annotations

import time
import uuid
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api import grants
from api.auth import AUTH_OFF_TENANT, Principal
from api.problems import Problem
from api.services import Services, services_of
from shared import keys
from shared.logs import bind


async def authenticate(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """Routes mark themselves with `opt`: `public`, `admin`, `scope` (what a
    grant must allow there; routes without one refuse grants), `stream_token`
    (takes `?token=`), `sse` (an event stream: its own connection budget) and
    `any_credential` (any key or grant may ask)."""
    opt = handler.opt
    # A preflight (answered by the CORS middleware before this, when CORS is
    # configured) or the automatic OPTIONS handler: no data, never a 401 or 429.
    if opt.get("public") or connection.scope.get("method") == "OPTIONS":
        return
    svc = services_of(connection)
    principal = await _principal(connection, opt, svc)
    if opt.get("admin") and not principal.admin:
        raise Problem(403, "forbidden", "this endpoint needs an admin key")
    grant = principal.grant
    if grant is not None and not opt.get("any_credential"):
        scope = opt.get("scope")
        if not grant.permits(connection.path_params.get("sid"), scope):
            raise Problem(
                403,
                "outside_grant",
                f"this credential is for {', '.join(grant.scopes)} on session "
                f"{grant.session_id} only",
            )
    connection.state.retry_ms = None
    if opt.get("sse"):
        # Stream (re)connections have their own budget, and are never refused (`api.grants`).
        connection.state.retry_ms = await grants.admit_stream(
            svc.redis, principal.key_id, svc.settings.stream_connects_per_minute
        )
    elif not opt.get("admin"):
        # Ops endpoints are not limited: a scrape must answer even when Redis,
        # where the windows are counted, does not.
        await _rate_limit(svc, principal)
    connection.state.principal = principal
    bind(
        request_id=connection.headers.get("x-request-id") or uuid.uuid4().hex,
        tenant=principal.tenant,
        session_id=connection.path_params.get("sid"),
    )


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    principal: Principal = connection.state.principal
    return principal


def tenant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    return principal_of(connection).tenant


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def _principal(
    connection: ASGIConnection[Any, Any, Any, Any],
    opt: dict[str, Any],
    svc: Services,
) -> Principal:
    keyring = svc.keyring
    if keyring is None:  # auth turned off
        return Principal(AUTH_OFF_TENANT, True, "auth-off")
    presented = _bearer(connection)
    if presented is not None:
        if presented.startswith(grants.TOKEN_PREFIX["browser"]):
            grant = await grants.redeem(svc.redis, presented, "browser")
            if grant is None:
                raise _unauthorized("unknown or expired browser credential")
            return _granted(grant)
        principal = keyring.find(presented)
        if principal is None:
            raise _unauthorized("unknown API key")
        return principal
    token = connection.query_params.get("token")
    if token and opt.get("stream_token"):
        grant = await grants.redeem(svc.redis, token, "stream")
        if grant is None or grant.session_id != connection.path_params.get("sid"):
            raise _unauthorized("unknown or expired stream token")
        if not grant.opens("last-event-id" in connection.headers):
            raise _unauthorized(
                "this stream token now only resumes its stream (Last-Event-ID); mint a new one"
            )
        return _granted(grant)
    raise _unauthorized("send `Authorization: Bearer <API key>`")


def _granted(grant: grants.Grant) -> Principal:
    # Each grant has its own budgets: a page cannot use up its backend's.
    return Principal(grant.tenant, False, f"grant:{grant.id}", grant)


async def _rate_limit(svc: Services, principal: Principal) -> None:
    limit = svc.settings.rate_limit_per_minute
    if limit <= 0:
        return
    now = time.time()
    count = await grants.count_in_window(svc.redis, keys.rate(principal.key_id, int(now // 60)))
    if count > limit:
        retry_after = max(1, int(60 - now % 60) + 1)
        raise Problem(
            429,
            "rate_limited",
            f"more than {limit} requests a minute with this key; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
