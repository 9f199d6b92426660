"""Sandboxes: the workspaces sessions run in."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litestar import Controller, Request, Response, delete, get, post

from api.guard import tenant_of
from api.idempotency import claim_or_replay, released_on_error
from api.pagination import paged_response
from api.problems import Problem, not_found
from api.services import (
    Services,
    decode_body,
    owned_sandbox,
    page_limit,
    services_of,
    sessions_deleted,
)
from shared.models import CreateSandbox, Sandbox, check_metadata
from shared.sandbox.confinement import SandboxSpec
from shared.sandbox.files import ClearReply, FileRefused, FileServiceBroken
from shared.sandbox.handle import OpenSandbox, SandboxRefused
from shared.sandbox.workspace import prepare_workspace, remove_empty_workspace, workspace_path
from shared.store import SandboxRecord
from shared.turns import IdemRecord

logger = logging.getLogger("sandstream.api")


async def _prepare(svc: Services, sandbox_id: str) -> None:
    """The sandbox's workspace, made (or found) ready for files and turns."""
    record = await svc.store.get_sandbox_record(sandbox_id)
    if record is None:  # deleted meanwhile (a replay racing a delete)
        raise not_found("sandbox", sandbox_id)
    await asyncio.get_running_loop().run_in_executor(
        svc.disk,
        prepare_workspace,
        svc.settings.sandbox_root,
        sandbox_id,
        record.uid,
        svc.confinement.quota,
    )


class SandboxController(Controller):
    path = "/api/v1/sandboxes"

    @post("/", status_code=201)
    async def create_sandbox(self, request: Request[Any, Any, Any]) -> Sandbox:
        svc = services_of(request)
        body = await decode_body(request, CreateSandbox, empty_ok=True)
        if reason := check_metadata(body.metadata):
            raise Problem(422, "invalid_body", reason, field="$.metadata")
        tenant = tenant_of(request)
        idem = await claim_or_replay(request, svc, tenant, "sandbox", await request.body())
        if isinstance(idem, IdemRecord):
            # Made by the first request, whose workspace may not be ready: its
            # reply was lost, or preparing it failed.
            sandbox = await owned_sandbox(svc, idem.resource_id, tenant)
            await _prepare(svc, sandbox.id)
            return sandbox
        async with released_on_error(idem):
            sandbox = await svc.store.create_sandbox(
                tenant,
                body.metadata,
                body.network,
                settles=idem.settlement() if idem is not None else None,
            )
            await _prepare(svc, sandbox.id)
        return sandbox

    @get("/")
    async def list_sandboxes(
        self, request: Request[Any, Any, Any], limit: int | None = None, cursor: str | None = None
    ) -> Response[bytes]:
        svc = services_of(request)
        tenant = tenant_of(request)
        try:
            page = await svc.store.list_sandboxes(tenant, page_limit(limit, svc.settings), cursor)
        except LookupError:
            raise Problem(400, "invalid_cursor", "unknown cursor", field="cursor") from None
        sandboxes = await svc.store.get_sandboxes(page.ids, tenant)
        return paged_response(request, sandboxes, page.next_cursor)

    @get("/{sandbox_id:str}")
    async def get_sandbox(self, request: Request[Any, Any, Any], sandbox_id: str) -> Sandbox:
        return await owned_sandbox(services_of(request), sandbox_id, tenant_of(request))

    @delete("/{sandbox_id:str}", status_code=204)
    async def delete_sandbox(self, request: Request[Any, Any, Any], sandbox_id: str) -> None:
        svc = services_of(request)
        tenant = tenant_of(request)
        await owned_sandbox(svc, sandbox_id, tenant)
        record = await svc.store.get_sandbox_record(sandbox_id)
        deleted = await svc.store.delete_sandbox(sandbox_id, tenant)
        await sessions_deleted(svc, deleted)
        if record is not None:
            await _empty_workspace(svc, record)


async def _empty_workspace(svc: Services, record: SandboxRecord) -> None:
    """Delete what the workspace holds from inside the sandbox (as its uid), then
    the workspace itself."""
    root = svc.settings.sandbox_root
    workspace = workspace_path(root, record.id)
    await svc.files.forget(record.id)
    if not workspace.exists():
        return
    spec = SandboxSpec(sandbox_id=record.id, workspace=workspace, uid=record.uid, network=False)
    sandbox = OpenSandbox(svc.confinement, spec, file_timeout=svc.settings.tool_timeout_seconds)
    try:
        await sandbox.files.request(ClearReply, "clear")
    except (FileRefused, FileServiceBroken, SandboxRefused) as exc:
        logger.warning("emptying the workspace of sandbox %s failed: %s", record.id, exc)
    finally:
        await sandbox.close()
    await asyncio.get_running_loop().run_in_executor(
        svc.disk, remove_empty_workspace, root, record.id
    )
