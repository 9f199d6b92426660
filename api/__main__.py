"""`python -m api` / `sandstream-api`: serve the API with uvicorn."""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn
from litestar import Litestar

from api.app import create_app
from shared.logs import configure_logging
from shared.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn waits for open connections before it stops, and SSE streams never
    close by themselves: on the stop signal, tell every stream's client to
    reconnect elsewhere first, so a rolling restart loses no one."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        services = getattr(self._app.state, "services", None)
        loop = asyncio.get_event_loop()
        if services is not None and not loop.is_closed():
            loop.call_soon_threadsafe(services.hub.drain)
        super().handle_exit(sig, frame)


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's lines go through our handler (text or JSON)
        timeout_graceful_shutdown=5,
        # Longer than a load balancer's idle timeout (often 60 s), so the proxy,
        # not uvicorn, closes idle connections: no request lands on a closing one.
        timeout_keep_alive=75,
        # Off by default: stream URLs may carry a token in their query string.
        access_log=settings.access_log,
    )
    DrainingServer(config, app).run()


if __name__ == "__main__":
    main()
