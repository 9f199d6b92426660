"""Health, readiness and queue inspection for operators (metrics: `api.metrics`)."""

from __future__ import annotations

import socket
from typing import Any

from litestar import Controller, Request, Response, get
from redis.exceptions import ResponseError

from api.openapi import build_openapi
from api.problems import problem_response
from api.schemas import Health
from api.services import services_of
from shared import keys
from shared.ops import QueueReport, WorkerReport, queue_report, worker_reports

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
        """Readiness: Redis answers and takes writes, so a message sent here can be
        queued (a read-only replica, a full `maxmemory` or a failing disk refuse them)."""
        svc = services_of(request)
        try:
            await svc.redis.set(keys.READY_PROBE, socket.gethostname(), px=60_000)
        except ResponseError as exc:
            detail = f"Redis refuses writes: {str(exc).split(' ', 1)[0]}"
            return problem_response(503, "queue_not_writable", detail)
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
