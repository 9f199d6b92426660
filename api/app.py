"""The Litestar application: routes, error handling and the per-process services."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from api.auth import KeyRing
from api.guard import authenticate
from api.hub import EventHub
from api.ops import OpsController
from api.problems import EXCEPTION_HANDLERS
from api.sandboxes import SandboxController
from api.services import Services
from api.sessions import SessionController
from api.stream import StreamController
from shared.queue import connect
from shared.settings import Settings

logger = logging.getLogger("sandstream.api")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    keyring = _keyring(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = await connect(settings.redis_url)
        hub = EventHub(redis, tick_seconds=settings.keepalive_seconds)
        await hub.start()
        app.state.services = Services(settings, redis, hub, keyring)
        try:
            yield
        finally:
            await hub.stop()
            await redis.aclose()

    return Litestar(
        route_handlers=[SandboxController, SessionController, StreamController, OpsController],
        lifespan=[lifespan],
        guards=[authenticate],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        # The OpenAPI document is ours (GET /openapi.json, api/openapi.py).
        openapi_config=None,
        # Logging is configured by `shared.logs` for both processes.
        logging_config=None,
    )


def _keyring(settings: Settings) -> KeyRing | None:
    if not settings.auth:
        logger.warning(
            "!!! AUTHENTICATION IS OFF (SANDSTREAM_AUTH=false): anyone who can reach this "
            "API can run commands in its sandboxes. Use this for local development only. !!!"
        )
        return None
    keyring = KeyRing.from_settings(settings)
    if not len(keyring):
        raise SystemExit(
            "no API keys configured: set SANDSTREAM_API_KEYS (tenant=key,...) or "
            "SANDSTREAM_API_KEYS_FILE, or SANDSTREAM_AUTH=false for local development"
        )
    return keyring
