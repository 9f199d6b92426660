"""The Litestar application: routes, error handling and the per-process services."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from litestar import Litestar

from api.approvals import ApprovalController
from api.auth import KeyRing
from api.browser import GrantController
from api.files import FilesController
from api.guard import authenticate
from api.hub import EventHub
from api.metrics import PROMETHEUS, MetricsController, forget_dead_processes
from api.ops import OpsController
from api.pages import cors_config, cors_for_allowed_origins_only, page_routes
from api.problems import EXCEPTION_HANDLERS, handle_redis_down
from api.reconnect import stream_aware
from api.sandboxes import SandboxController
from api.services import Services
from api.sessions import SessionController
from api.stream import StreamController
from shared import scripts
from shared.heap import freeze_startup_heap
from shared.logs import configure_logging
from shared.queue import connect, warn_if_unauthenticated
from shared.settings import Settings

logger = logging.getLogger("sandstream.api")


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    keyring = _keyring(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        forget_dead_processes()
        warn_if_unauthenticated(settings.redis_url, settings.redis_password, logger)
        redis = await connect(
            settings.redis_url,
            settings.redis_password,
            settings.redis_tls_ca_file,
            socket_timeout=settings.redis_socket_timeout_seconds,
        )
        # The hub's pub/sub connection waits for messages as long as there are
        # none: a client of its own, without the socket timeout.
        hub_redis = await connect(
            settings.redis_url, settings.redis_password, settings.redis_tls_ca_file
        )
        hub = EventHub(
            hub_redis,
            tick_seconds=settings.keepalive_seconds,
            client_buffer_bytes=settings.stream_buffer_bytes,
            confirm_seconds=settings.redis_socket_timeout_seconds,
        )
        await hub.start()
        app.state.services = Services(settings, redis, hub, keyring)
        await scripts.load_registered(redis)
        freeze_startup_heap()
        restore = _drain_on_stop_signal(hub)
        try:
            yield
        finally:
            restore()
            await app.state.services.files.close()
            await hub.stop()
            await hub_redis.aclose()
            await redis.aclose()
            confinement = app.state.services.confinement
            if confinement.cgroups is not None:
                confinement.cgroups.close()

    cors = cors_config(settings)
    return Litestar(
        route_handlers=[
            SandboxController,
            FilesController,
            SessionController,
            ApprovalController,
            StreamController,
            GrantController,
            OpsController,
            MetricsController,
            *page_routes(),
        ],
        lifespan=[lifespan],
        middleware=[PROMETHEUS.middleware],
        guards=[authenticate],
        exception_handlers=_exception_handlers(),
        cors_config=cors,
        before_send=cors_for_allowed_origins_only(cors),
        request_max_body_size=settings.max_body_bytes,
        # The OpenAPI document is ours (GET /openapi.json, api/openapi.py).
        openapi_config=None,
        # Logging is configured by `shared.logs` for both processes.
        logging_config=None,
    )


def _exception_handlers() -> dict[type[Exception] | int, Any]:
    """`api.problems`' handlers, except that a browser's stream is told to come
    back when the store is unreachable (`api.reconnect`): a 503 would end it."""
    redis_down = stream_aware(handle_redis_down)
    return {
        kind: redis_down if handler is handle_redis_down else handler
        for kind, handler in EXCEPTION_HANDLERS.items()
    }


def _drain_on_stop_signal(hub: EventHub) -> Callable[[], None]:
    """uvicorn waits for open connections before it stops, and SSE streams never
    close by themselves: on the stop signal, tell every stream's client to
    reconnect elsewhere first (then let the server's own handler stop it), so a
    rolling restart loses no one. Works for one process and for each of
    several uvicorn worker processes; returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def wrap(handler: Callable[[int, FrameType | None], Any]) -> Callable[..., None]:
        def on_signal(sig: int, frame: FrameType | None) -> None:
            loop.call_soon_threadsafe(hub.drain)
            handler(sig, frame)

        return on_signal

    for sig, handler in previous.items():
        if callable(handler):
            signal.signal(sig, wrap(handler))

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def app_factory() -> Litestar:
    """The app of one of several uvicorn worker processes (`SANDSTREAM_API_WORKERS`),
    each of which configures itself from the environment."""
    settings = Settings.from_env()
    configure_logging(settings)
    return create_app(settings)


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
