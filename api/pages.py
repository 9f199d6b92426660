"""What the API serves to browsers besides the API: the console (`/console`), the
API docs (`/docs`), and the CORS policy under which pages elsewhere may call it.

Both pages are static files shipped in the package (`api/static/`) that talk to
the API like any other client, so they need no build step, no CDN and no
server-side rendering; `/docs` reads the same `/openapi.json` the tests check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers, MutableScopeHeaders
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.types import BeforeMessageSendHookHandler, Message, Scope

from shared.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"

# The pages load nothing from elsewhere and call only this API: a script
# injected into them could not send what it reads anywhere else.
_CSP = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)


def cors_config(settings: Settings) -> CORSConfig | None:
    """Pages on the origins of `SANDSTREAM_CORS_ORIGINS` may call the API with a
    bearer credential (never cookies, so no credentialed CORS) and read the
    headers that paging and throttling put on responses. Litestar's middleware
    answers preflights before routing, so before authentication and rate limits."""
    origins = settings.cors_origin_list()
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=[
            "authorization",
            "content-type",
            "idempotency-key",
            "last-event-id",
            "x-request-id",
        ],
        expose_headers=["x-next-cursor", "link", "retry-after"],
        allow_credentials=False,
        max_age=600,
    )


_CORS_HEADERS = (
    "access-control-allow-headers",
    "access-control-allow-methods",
    "access-control-expose-headers",
)


def cors_for_allowed_origins_only(config: CORSConfig | None) -> list[BeforeMessageSendHookHandler]:
    """Litestar's CORS middleware puts its allow and expose headers on the response
    to any request with an Origin, allowed or not (only Access-Control-Allow-Origin
    depends on it). They grant nothing without that one, but a stranger's page
    should learn nothing of the API's CORS policy either: this hook, which sees
    each response after the middleware, takes them off again."""
    if config is None or config.is_allow_all_origins:
        return []

    async def strip(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        origin = Headers.from_scope(scope).get("origin")
        if origin is None or config.is_origin_allowed(origin):
            return
        headers = MutableScopeHeaders.from_message(message)
        for name in _CORS_HEADERS:
            if name in headers:
                del headers[name]

    return [strip]


def _secure(response: Response[Any]) -> Response[Any]:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@get("/", opt={"public": True}, include_in_schema=False)
async def root() -> Redirect:
    """The console is where a person who opens the API's address wants to be."""
    return Redirect(path="/console/")


def page_routes() -> list[Any]:
    return [
        root,
        *(
            create_static_files_router(
                path=f"/{name}",
                directories=[STATIC / name],
                html_mode=True,
                name=name,
                opt={"public": True},
                after_request=_secure,
            )
            for name in ("console", "docs")
        ),
    ]
