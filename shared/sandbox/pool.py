"""SandboxPool: open sandboxes kept warm between their users in one process.

Starting a sandbox's file service costs a bubblewrap and a Python start (tens
of milliseconds, more on a loaded machine), and a turn that runs a tool needs
one before its first tool (the workspace snapshot behind `files_changed`). So a
sandbox whose service finished its last conversation cleanly is kept for the
next user of the same sandbox, for `idle_seconds`, at most `idle_per_sandbox` of
them and `max_idle` in all (the oldest goes first: a tenant who touches many
sandboxes cannot make a process keep a service for each); one left mid-way (an
error, an interrupt, a turn that fenced itself off) was stopped by its channel
and is closed with everything it held. Each user has a sandbox to itself while
it holds it: nothing of one turn or request is shared with another running at
the same time.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox

logger = logging.getLogger("sandstream.sandbox")


class SandboxPool:
    def __init__(
        self,
        confinement: Confinement,
        *,
        file_timeout: float,
        idle_seconds: float,
        idle_per_sandbox: int,
        max_idle: int,
    ) -> None:
        self._confinement = confinement
        self._file_timeout = file_timeout
        self._idle_seconds = idle_seconds
        self._idle_per_sandbox = idle_per_sandbox
        self._max_idle = max_idle
        self._idle: dict[str, list[tuple[OpenSandbox, float]]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak ones

    def take(self, spec: SandboxSpec) -> OpenSandbox:
        """A kept sandbox of the same spec, or a new one (nothing started yet)."""
        idle = self._idle.get(spec.sandbox_id)
        while idle:
            sandbox, _ = idle.pop()
            if not idle:
                del self._idle[spec.sandbox_id]
            if sandbox.spec == spec and sandbox.files.alive:
                return sandbox
            self._close_soon(sandbox)
        return OpenSandbox(self._confinement, spec, file_timeout=self._file_timeout)

    async def give_back(self, sandbox: OpenSandbox) -> None:
        """Keep the sandbox for the next user if its service is alive and idle
        (alive means its last conversation ended as the protocol says); else close it."""
        sandbox_id = sandbox.spec.sandbox_id
        keep = self._idle_seconds > 0 and self._max_idle > 0
        if sandbox.files.alive and self.idle(sandbox_id) < self._idle_per_sandbox and keep:
            while self.idle_total() >= self._max_idle:
                self._close_soon(self._take_oldest())
            self._idle.setdefault(sandbox_id, []).append((sandbox, time.monotonic()))
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.create_task(self._sweep())
            return
        await sandbox.close()

    def idle_total(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def _take_oldest(self) -> OpenSandbox:
        sandbox_id, index = min(
            ((sid, i) for sid, idle in self._idle.items() for i in range(len(idle))),
            key=lambda at: self._idle[at[0]][at[1]][1],
        )
        idle = self._idle[sandbox_id]
        sandbox, _ = idle.pop(index)
        if not idle:
            del self._idle[sandbox_id]
        return sandbox

    def _close_soon(self, sandbox: OpenSandbox) -> None:
        task = asyncio.create_task(sandbox.close())
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("closing a kept sandbox failed: %r", task.exception())

    async def _sweep(self) -> None:
        """Close sandboxes idle for longer than `idle_seconds`, until none is left."""
        while self._idle:
            await asyncio.sleep(self._idle_seconds / 2)
            now = time.monotonic()
            expired = []
            for sandbox_id, idle in list(self._idle.items()):
                kept = []
                for sandbox, since in idle:
                    if now - since > self._idle_seconds:
                        expired.append(sandbox)
                    else:
                        kept.append((sandbox, since))
                if kept:
                    self._idle[sandbox_id] = kept
                else:
                    del self._idle[sandbox_id]
            for sandbox in expired:
                await sandbox.close()

    def idle(self, sandbox_id: str) -> int:
        """How many of the sandbox's sandboxes are kept."""
        return len(self._idle.get(sandbox_id, []))

    async def forget(self, sandbox_id: str) -> None:
        """Close the sandbox's kept sandboxes (it is being deleted)."""
        for sandbox, _ in self._idle.pop(sandbox_id, []):
            await sandbox.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for sandbox_id in list(self._idle):
            await self.forget(sandbox_id)
