"""How the files API reaches into a sandbox: through the sandbox's own file service.

This process runs as root; it never opens sandbox content by path. Every file
operation is a conversation with the file service, started under the
sandbox's confinement (its uid, cgroup, bubblewrap, no network) like the
agent's own file tools, so the kernel decides what a path reaches.

A service that finished its conversation cleanly is kept for the next request
to the same sandbox (`shared.sandbox.pool`); one left mid-way (an error, a
client gone) is stopped. Each request has a service of its own: at most
`PER_SANDBOX` of one sandbox's requests run at once in this process, the rest
wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import NamedTuple

from api.problems import Problem, not_found
from shared.models import is_uuid
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.files import FileRefused, FileServiceBroken
from shared.sandbox.handle import OpenSandbox, SandboxRefused
from shared.sandbox.pool import SandboxPool
from shared.sandbox.workspace import prepare_workspace, workspace_path
from shared.settings import Settings
from shared.store import SandboxRecord, SessionStore

logger = logging.getLogger("sandstream.api")

PER_SANDBOX = 4
IDLE_PER_SANDBOX = 2
HASHES_KEPT = 4096


class KnownHash(NamedTuple):
    key: list[int]  # the file's version (device, inode, size, mtime, ctime)
    sha256: str


class SandboxFiles:
    def __init__(
        self, settings: Settings, confinement: Confinement, store: SessionStore, disk: Executor
    ) -> None:
        self._settings = settings
        self._confinement = confinement
        self._store = store
        self._disk = disk
        self._prepared: set[str] = set()
        self._pool = SandboxPool(
            confinement,
            file_timeout=settings.tool_timeout_seconds,
            idle_seconds=settings.sandbox_idle_seconds,
            idle_per_sandbox=IDLE_PER_SANDBOX,
            max_idle=settings.sandbox_idle_max,
        )
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}
        self._hashes: OrderedDict[tuple[str, str], KnownHash] = OrderedDict()

    async def owned(self, sandbox_id: str, tenant: str) -> SandboxSpec:
        """The tenant's sandbox, its workspace made ready; another tenant's is a 404."""
        record = await self._store.get_sandbox_record(sandbox_id) if is_uuid(sandbox_id) else None
        if record is None or record.tenant != tenant:
            raise not_found("sandbox", sandbox_id)
        return await self._spec(record)

    async def _spec(self, record: SandboxRecord) -> SandboxSpec:
        root = self._settings.sandbox_root
        if record.id not in self._prepared:
            await asyncio.get_running_loop().run_in_executor(
                self._disk, prepare_workspace, root, record.id, record.uid, self._confinement.quota
            )
            self._prepared.add(record.id)
        return SandboxSpec(
            sandbox_id=record.id,
            workspace=workspace_path(root, record.id),
            uid=record.uid,
            network=False,
        )

    @contextlib.asynccontextmanager
    async def open(self, spec: SandboxSpec) -> AsyncIterator[OpenSandbox]:
        """A sandbox with a file service of this request's own."""
        semaphore, users = self._slots.setdefault(
            spec.sandbox_id, (asyncio.Semaphore(PER_SANDBOX), [0])
        )
        users[0] += 1
        try:
            async with semaphore:
                sandbox = self._pool.take(spec)
                try:
                    yield sandbox
                finally:
                    await self._pool.give_back(sandbox)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._slots[spec.sandbox_id]

    async def forget(self, sandbox_id: str) -> None:
        """Stop the sandbox's idle services (it is being deleted)."""
        await self._pool.forget(sandbox_id)
        self._prepared.discard(sandbox_id)
        for key in [k for k in self._hashes if k[0] == sandbox_id]:
            del self._hashes[key]

    async def close(self) -> None:
        await self._pool.close()
        self._prepared.clear()
        self._hashes.clear()

    # ---- hashes of files that did not change -------------------------------------

    def known_hash(self, sandbox_id: str, path: str) -> KnownHash | None:
        return self._hashes.get((sandbox_id, path))

    def remember_hash(self, sandbox_id: str, path: str, known: KnownHash) -> None:
        """Keep a file's hash by its version, so the next download of the same
        version (a resumed one, asking for a Range) skips hashing it again."""
        self._hashes[(sandbox_id, path)] = known
        self._hashes.move_to_end((sandbox_id, path))
        while len(self._hashes) > HASHES_KEPT:
            self._hashes.popitem(last=False)


# ---- what a refusal is in HTTP --------------------------------------------------------

_PROBLEMS: dict[str, tuple[int, str]] = {
    "invalid_path": (400, "invalid_path"),
    "outside": (400, "invalid_path"),
    "invalid_cursor": (400, "invalid_cursor"),
    "invalid_format": (400, "invalid_parameter"),
    "not_found": (404, "file_not_found"),
    "denied": (403, "permission_denied"),
    "is_a_directory": (409, "is_a_directory"),
    "not_a_directory": (409, "not_a_directory"),
    "not_a_file": (409, "not_a_file"),
    "not_empty": (409, "directory_not_empty"),
    "conflict": (409, "path_conflict"),
    "exists": (409, "path_conflict"),
    "precondition_failed": (412, "precondition_failed"),
    "too_large": (413, "file_too_large"),
    "archive_too_large": (413, "archive_too_large"),
    "entry_refused": (422, "archive_entry_refused"),
    "invalid_archive": (422, "invalid_archive"),
    "timeout": (503, "file_operation_timeout"),
    "quota": (507, "quota_exceeded"),
    "no_space": (507, "insufficient_storage"),
}


def file_problem(exc: FileRefused | FileServiceBroken | SandboxRefused) -> Problem:
    """The problem details for a refusal of the file service (or for no service)."""
    if isinstance(exc, SandboxRefused):
        return Problem(503, "sandbox_unavailable", str(exc))
    if isinstance(exc, FileServiceBroken):
        logger.warning("a sandbox's file service failed: %s", exc)
        return Problem(
            503,
            "file_service_unavailable",
            f"the sandbox's file service could not complete the request ({exc}); retry",
        )
    status, code = _PROBLEMS.get(exc.code, (409, "file_operation_failed"))
    if exc.code == "malformed":
        logger.warning("the file service did not understand a request: %s", exc)
    if exc.entry is not None:
        return Problem(status, code, str(exc), entry=exc.entry)
    return Problem(status, code, str(exc))
