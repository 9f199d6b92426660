"""GET /metrics: Prometheus, for one API process or several behind one port.

Two kinds of series:
- this process's own: HTTP requests (Litestar's Prometheus plugin, by route
  template) and SSE connections open. With several uvicorn worker processes
  (`SANDSTREAM_API_WORKERS`), `prometheus_client`'s multiprocess mode adds up
  every process's figures, so any process answering the scrape reports them all.
- the fleet's, from Redis (`shared.metrics`): the queue, live workers, turns
  started, completed and failed, durations, time to first token, tool
  durations, events published. The same on every replica.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from litestar import Controller, Request, get
from litestar.plugins.prometheus import PrometheusConfig
from litestar.response import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
    multiprocess,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.services import services_of
from shared.metrics import MULTIPROC_ENV, render_fleet
from shared.ops import queue_and_figures, worker_reports
from shared.sandbox.process import process_alive

SSE_CONNECTIONS = Gauge(
    "sandstream_sse_connections",
    "SSE streams open on this API (all its processes).",
    multiprocess_mode="livesum",
)

_REDIS_UP = (
    "# HELP sandstream_redis_up Whether this API reached Redis for this scrape.\n"
    "# TYPE sandstream_redis_up gauge\nsandstream_redis_up {}\n"
)

PROMETHEUS = PrometheusConfig(
    app_name="sandstream",
    prefix="sandstream_http",
    # Label by route template, not by path: one series per route, not per session.
    group_path=True,
    # SSE streams are counted by `sandstream_sse_connections`: a request timer
    # around a stream would measure its whole life, and cost memory and time on
    # every event of every stream.
    exclude=["^/metrics$", "^/api/v1/sessions/[^/]+/stream$"],
)


def forget_dead_processes() -> None:
    """Drop the live gauges of API processes that died without saying so (a
    crashed uvicorn worker), so they stop counting."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if pid != os.getpid() and not process_alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class MetricsController(Controller):
    path = "/metrics"

    @get(opt={"admin": True}, media_type=CONTENT_TYPE_LATEST)
    async def metrics(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Prometheus text format (admin keys only)."""
        svc = services_of(request)
        registry = REGISTRY
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        own = generate_latest(registry)
        try:
            queue, figures = await queue_and_figures(svc.redis)
            workers = await worker_reports(svc.redis, svc.settings.worker_heartbeat_seconds * 3)
            fleet = _REDIS_UP.format(1) + render_fleet(figures, queue, len(workers))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # The process's own figures still count; the fleet's are in Redis.
            fleet = _REDIS_UP.format(0)
        return Response(own + fleet.encode(), media_type=CONTENT_TYPE_LATEST)
