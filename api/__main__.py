"""`python -m api` / `sandstream-api`: serve the API with uvicorn.

One process by default; `SANDSTREAM_API_WORKERS=N` runs N uvicorn worker
processes on the one port, with Prometheus' multiprocess mode so that /metrics
adds up all of them whichever process answers. Each process tells its SSE
clients to reconnect elsewhere when it is stopped (`api.app`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from api.http_limits import LimitedHttpToolsProtocol
from shared.logs import configure_logging
from shared.metrics import MULTIPROC_ENV
from shared.settings import Settings


def _server_options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        "log_config": None,  # uvicorn's lines go through our handler (text or JSON)
        "timeout_graceful_shutdown": 5,
        # libuv's event loop and a C HTTP parser: less time per request and per
        # event; the parser's input is bounded by `api.http_limits`.
        "loop": "uvloop",
        "http": LimitedHttpToolsProtocol,
        # Longer than a load balancer's idle timeout (often 60 s), so the proxy,
        # not uvicorn, closes idle connections: no request lands on a closing one.
        "timeout_keep_alive": 75,
        # Off by default: stream URLs may carry a token in their query string.
        "access_log": settings.access_log,
    }


def _metrics_directory() -> Path | None:
    """Prometheus' multiprocess mode needs a directory shared by the worker
    processes and emptied before they start (stale files would count twice).
    Returns the directory to remove at exit, if it is ours."""
    given = os.environ.get(MULTIPROC_ENV)
    directory = Path(given) if given else Path(tempfile.mkdtemp(prefix="sandstream-metrics-"))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    return None if given else directory


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings)
    if settings.api_workers > 1:
        # Before anything imports prometheus_client, which reads the variable once.
        ours = _metrics_directory()
        config = uvicorn.Config(
            "api.app:app_factory",
            factory=True,
            workers=settings.api_workers,
            **_server_options(settings),
        )
        try:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        finally:
            if ours is not None:
                shutil.rmtree(ours, ignore_errors=True)
        return
    from api.app import create_app

    config = uvicorn.Config(create_app(settings), **_server_options(settings))
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
