"""Health, readiness, metrics and queue inspection for operators."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get

from api.openapi import build_openapi
from api.problems import problem_response
from api.schemas import Health
from api.services import services_of
from shared.ops import QueueReport, WorkerReport, queue_report, worker_reports
from shared.queue import queue_depth

OPENAPI = build_openapi("0.1.0")


class OpsController(Controller):
    path = "/"

    @get("/healthz", opt={"public": True})
    async def healthz(self) -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @get("/openapi.json", opt={"public": True})
    async def openapi(self) -> dict[str, Any]:
        """The OpenAPI document of this API."""
        return OPENAPI

    @get("/readyz", opt={"public": True})
    async def readyz(self, request: Request[Any, Any, Any]) -> Response[Any]:
        """Readiness: Redis answers."""
        svc = services_of(request)
        try:
            await svc.redis.ping()
        except Exception:
            return problem_response(503, "store_unavailable", "Redis does not answer")
        return Response(Health(status="ready"))

    @get("/api/v1/ops/queues", opt={"admin": True})
    async def queues(self, request: Request[Any, Any, Any]) -> list[QueueReport]:
        """Per queue: queued, deferred and in progress, the oldest queued job's age,
        the last hour's turn outcomes and recent turn durations."""
        return [await queue_report(services_of(request).redis)]

    @get("/api/v1/ops/workers", opt={"admin": True})
    async def workers(self, request: Request[Any, Any, Any]) -> list[WorkerReport]:
        """Live workers: host, pid, running turns, last heartbeat."""
        svc = services_of(request)
        return await worker_reports(svc.redis, svc.settings.worker_heartbeat_seconds * 3)

    @get("/api/v1/ops/metrics", media_type="text/plain; version=0.0.4", opt={"admin": True})
    async def metrics(self, request: Request[Any, Any, Any]) -> str:
        svc = services_of(request)
        rows = [
            (
                "sandstream_queued_turns",
                "Turns waiting for a worker.",
                await queue_depth(svc.redis),
            ),
            (
                "sandstream_running_turns",
                "Turns in progress.",
                await svc.store.running_count(),
            ),
            ("sandstream_stream_clients", "SSE clients of this process.", svc.hub.client_count),
        ]
        return "".join(
            f"# HELP {name} {text}\n# TYPE {name} gauge\n{name} {value}\n"
            for name, text, value in rows
        )
