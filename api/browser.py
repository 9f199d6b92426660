"""Browser credentials, stream tokens, and links a page on another origin can follow.

The rules of what a grant allows are in `api.grants`; these are the routes that
mint them. The recommended flow (README, "Browsers"): the page asks its own
backend, which knows its user, for access to one session; the backend calls
`POST /sessions/{sid}/grants` with its tenant key and hands the page the
browser credential; the page calls the API directly with it, and mints a stream
token with it for `EventSource`.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, get, post

from api import grants
from api.guard import principal_of
from api.problems import Problem
from api.schemas import BrowserGrant, CreateGrant, Credential, StreamToken
from api.services import decode_body, owned_session, services_of


def absolute_url(request: Request[Any, Any, Any], path: str) -> str:
    """`path` on this API, absolute, so that a page on another origin can use it as
    is: under `SANDSTREAM_PUBLIC_URL` (what clients reach, behind a proxy) or else
    the scheme and host the request came in on."""
    public = services_of(request).settings.public_url.rstrip("/")
    return (public or str(request.base_url).rstrip("/")) + path


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class GrantController(Controller):
    path = "/api/v1"

    @post("/sessions/{sid:str}/grants", status_code=201)
    async def create_grant(self, request: Request[Any, Any, Any], sid: str) -> BrowserGrant:
        """Mint a browser credential for this one session (tenant keys only)."""
        svc = services_of(request)
        principal = principal_of(request)
        await owned_session(svc, sid, principal.tenant)
        body = await decode_body(request, CreateGrant, empty_ok=True)
        longest = svc.settings.grant_max_seconds
        lifetime = body.expires_in or svc.settings.grant_seconds
        if lifetime > longest:
            raise Problem(
                422, "invalid_body", f"expires_in is at most {longest} s", field="$.expires_in"
            )
        scopes = tuple(scope for scope in grants.SCOPES if scope in body.scopes)
        token, grant = await grants.mint(
            svc.redis,
            kind="browser",
            tenant=principal.tenant,
            session_id=sid,
            scopes=scopes,
            key_id=principal.key_id,
            lifetime=lifetime,
        )
        return BrowserGrant(
            token=token,
            session_id=sid,
            scopes=list(scopes),
            expires_in=lifetime,
            expires_at=_rfc3339(grant.expires_at),
            session_url=absolute_url(request, f"/api/v1/sessions/{sid}"),
            stream_token_url=absolute_url(request, f"/api/v1/sessions/{sid}/stream-token"),
        )

    @post("/sessions/{sid:str}/stream-token", status_code=201, opt={"scope": "stream"})
    async def stream_token(self, request: Request[Any, Any, Any], sid: str) -> StreamToken:
        """A token that opens this session's stream, for reading, and nothing else
        (`api.grants`: it opens the stream for minutes and resumes it for hours);
        minted by a tenant key or by a browser credential (then never outliving it)."""
        svc = services_of(request)
        principal = principal_of(request)
        await owned_session(svc, sid, principal.tenant)
        parent = principal.grant
        token, grant = await grants.mint(
            svc.redis,
            kind="stream",
            tenant=principal.tenant,
            session_id=sid,
            scopes=("stream",),
            key_id=principal.key_id if parent is None else parent.key_id,
            lifetime=svc.settings.stream_grant_seconds,
            opening=svc.settings.stream_token_seconds,
            not_after=None if parent is None else parent.expires_at,
        )
        return StreamToken(
            token=token,
            opens_for=max(0, int(grant.opens_until - time.time())),
            expires_in=max(0, int(grant.seconds_left())),
            expires_at=_rfc3339(grant.expires_at),
            stream_url=absolute_url(request, f"/api/v1/sessions/{sid}/stream?token={token}"),
        )

    @get("/whoami", opt={"any_credential": True})
    async def whoami(self, request: Request[Any, Any, Any]) -> Credential:
        """What the presented credential is: a page (or the console) learns from it
        which session a browser credential is for, and whether a key is an admin's."""
        principal = principal_of(request)
        grant = principal.grant
        if grant is None:
            return Credential(kind="key", tenant=principal.tenant, admin=principal.admin)
        return Credential(
            kind="browser",
            tenant=grant.tenant,
            admin=False,
            session_id=grant.session_id,
            scopes=list(grant.scopes),
            expires_at=_rfc3339(grant.expires_at),
        )
