"""WorkspaceChanges: what one turn created, modified and deleted in its workspace.

The file service snapshots the workspace when the turn is about to run its
first tool (started as soon as the model announces the call, so the walk
overlaps the call's streaming) and compares it with the workspace when the turn
ends. A turn that runs no tool changed nothing and costs nothing. Whatever
goes wrong here never fails the turn: it ends with the list marked truncated.
"""

from __future__ import annotations

import asyncio
import logging

from shared.models import FileChange
from shared.sandbox import transfers
from shared.sandbox.files import FileRefused, FileServiceBroken
from shared.sandbox.handle import OpenSandbox, SandboxRefused

logger = logging.getLogger("sandstream.turn")

FILES_CHANGED_MAX = 1000
# A walk examines at most this many entries (the default inode quota) for this long.
SNAPSHOT_ENTRIES = 100_000
SNAPSHOT_SECONDS = 10.0
SNAPSHOT_BYTES = 32 << 20
_FAILURES = (FileRefused, FileServiceBroken, SandboxRefused, TimeoutError)


class WorkspaceChanges:
    def __init__(self, sandbox: OpenSandbox) -> None:
        self._sandbox = sandbox
        self._before: asyncio.Task[transfers.Snapshot | None] | None = None

    def start(self) -> None:
        """Take the snapshot in the background, if not taken yet."""
        if self._before is None:
            self._before = asyncio.create_task(self._snapshot())

    async def ready(self) -> None:
        """Wait for the snapshot: call it before a tool may change anything."""
        self.start()
        assert self._before is not None
        # Shielded: an interrupt stops the turn, not the snapshot its end compares with.
        await asyncio.shield(self._before)

    async def _snapshot(self) -> transfers.Snapshot | None:
        try:
            async with (
                asyncio.timeout(SNAPSHOT_SECONDS * 2),
                self._sandbox.files.channel() as channel,
            ):
                return await transfers.snapshot(
                    channel,
                    max_entries=SNAPSHOT_ENTRIES,
                    max_seconds=SNAPSHOT_SECONDS,
                    max_bytes=SNAPSHOT_BYTES,
                )
        except _FAILURES as exc:
            logger.warning("the workspace could not be snapshot before the turn's tools: %s", exc)
            return None

    async def collect(self) -> tuple[list[FileChange], bool]:
        """What changed since the snapshot, and whether that is cut short."""
        before = self._before
        if before is None:
            return [], False
        snapshot = await before
        if snapshot is None:
            return [], True
        try:
            async with (
                asyncio.timeout(SNAPSHOT_SECONDS * 2),
                self._sandbox.files.channel() as channel,
            ):
                found = await transfers.changes(
                    channel,
                    snapshot,
                    max_entries=SNAPSHOT_ENTRIES,
                    max_seconds=SNAPSHOT_SECONDS,
                    max_changes=FILES_CHANGED_MAX,
                    max_bytes=SNAPSHOT_BYTES,
                )
        except _FAILURES as exc:
            logger.warning("what the turn changed in the workspace is unknown: %s", exc)
            return [], True
        changes = [
            FileChange(path=c.path, change=c.change, type=c.type, size=c.size)
            for c in found.changes[:FILES_CHANGED_MAX]
        ]
        return changes, found.truncated or snapshot.truncated
