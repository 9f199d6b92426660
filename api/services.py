"""What the route handlers share in one API process: settings, Redis, store, hub."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from arq.connections import ArqRedis
from litestar import Request
from litestar.connection import ASGIConnection

from api.auth import KeyRing
from api.file_access import SandboxFiles
from api.hub import EventHub
from api.problems import Problem, invalid_body, not_found
from shared import keys
from shared.approvals import ApprovalStore
from shared.events import SessionDeleted
from shared.models import Sandbox, Session, is_uuid, now_rfc3339
from shared.sandbox.confinement import Confinement
from shared.settings import Settings
from shared.store import SessionStore
from shared.turns import ControlMessage, encode_control

T = TypeVar("T")


class Services:
    def __init__(
        self, settings: Settings, redis: ArqRedis, hub: EventHub, keyring: KeyRing | None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.hub = hub
        self.keyring = keyring  # None when authentication is turned off
        # Workspaces are made ready and emptied with the sandbox's own confinement.
        self.confinement = Confinement.detect(settings, "api", networks=False)
        self.disk = ThreadPoolExecutor(2, thread_name_prefix="workspace")
        self.store = SessionStore(
            redis,
            log_max_events=settings.log_max_events,
            log_ttl_seconds=settings.log_ttl_seconds,
            sandbox_uid_base=settings.sandbox_uid_base,
        )
        self.approvals = ApprovalStore(
            redis,
            log_max_events=settings.log_max_events,
            log_ttl_seconds=settings.log_ttl_seconds,
        )
        # The files API's way into sandboxes: their file services.
        self.files = SandboxFiles(settings, self.confinement, self.store, self.disk)


def services_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Services:
    services: Services = connection.app.state.services
    return services


def check_id(what: str, ident: str) -> str:
    """Ids are UUIDs; anything else cannot exist, so it is a 404 like any unknown id."""
    if not is_uuid(ident):
        raise not_found(what, ident)
    return ident


async def owned_sandbox(svc: Services, sandbox_id: str, tenant: str) -> Sandbox:
    """The tenant's sandbox; another tenant's is as absent as one that never existed."""
    sandbox = await svc.store.get_sandbox(check_id("sandbox", sandbox_id), tenant)
    if sandbox is None:
        raise not_found("sandbox", sandbox_id)
    return sandbox


async def owned_session(svc: Services, sid: str, tenant: str) -> Session:
    session = await svc.store.get_session(check_id("session", sid), tenant)
    if session is None:
        raise not_found("session", sid)
    return session


async def decode_body(request: Request[Any, Any, Any], kind: type[T], *, empty_ok: bool) -> T:
    raw = await request.body()
    if not raw.strip():
        if not empty_ok:
            raise Problem(400, "empty_body", "the request needs a JSON body")
        raw = b"{}"
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise invalid_body(exc) from None
    except RecursionError:
        raise Problem(422, "invalid_body", "the body nests too deeply", field="$") from None


def page_limit(limit: int | None, settings: Settings) -> int:
    if limit is None:
        return 50
    if not 1 <= limit <= settings.page_limit_max:
        raise Problem(
            400,
            "invalid_parameter",
            f"limit must be between 1 and {settings.page_limit_max}",
            field="limit",
        )
    return limit


async def sessions_deleted(svc: Services, sessions: list[Session]) -> None:
    """After sessions were deleted: ask the workers to stop their turns, and
    every API process to end their streams and waiting sends (`EventHub`)."""
    for session in sessions:
        deleted = SessionDeleted(session_id=session.id, created_at=now_rfc3339())
        await svc.redis.publish(keys.DELETED_CHANNEL, msgspec.json.encode(deleted))
        if session.turn_id:
            await publish_interrupt(svc, session.id, session.turn_id)


async def publish_interrupt(svc: Services, sid: str, turn_id: str) -> None:
    control = encode_control(ControlMessage(session_id=sid, turn_id=turn_id))
    await svc.redis.publish(keys.CONTROL_CHANNEL, control)
