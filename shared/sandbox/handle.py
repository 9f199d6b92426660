"""OpenSandbox: a sandbox as one turn uses it, and everything that lives as long.

The sandbox's cgroup in this process, its private network (for a network
sandbox) and its file service are all taken when first needed. Closing ends
them all, whatever state they are in. A turn's end hands it back to the
process's `SandboxPool`, which keeps it for the sandbox's next user only when its
file service sits idle between conversations (no request of the turn is left
running in it); every other ending (an interrupt mid-request, a worker that
fences itself off) stops the service, so no operation of a turn outlives it.
"""

from __future__ import annotations

import asyncio
import math

from shared.sandbox.cgroups import SandboxCgroup
from shared.sandbox.confinement import Confinement, SandboxRefused, SandboxSpec
from shared.sandbox.files import FileClient
from shared.sandbox.network import PrivateNetwork
from shared.sandbox.process import CommandResult, run_command, spawn

__all__ = ["OpenSandbox", "SandboxRefused"]


class OpenSandbox:
    def __init__(self, confinement: Confinement, spec: SandboxSpec, *, file_timeout: float) -> None:
        self.confinement = confinement
        self.spec = spec
        self._cgroup: SandboxCgroup | None = None
        self._network: PrivateNetwork | None = None
        self._network_lock = asyncio.Lock()
        self.files = FileClient(self._spawn_file_service, timeout=file_timeout)

    async def run(self, command: str, *, timeout: float, output_cap: int) -> CommandResult:
        """Run a shell command in the sandbox; `walls` of the result names the
        limits it ran into."""
        netns = await self._network_path()
        launch = self.confinement.launch(
            self.spec,
            ["/bin/bash", "-c", command],
            cgroup=self._joined_cgroup(),
            netns=netns,
            cpu_seconds=max(1, math.ceil(timeout)),
        )
        before = self._cgroup.walls() if self._cgroup is not None else None
        result = await run_command(launch, timeout=timeout, output_cap=output_cap)
        if self._cgroup is not None and before is not None:
            result.walls += self._cgroup.walls().hit_since(before)
        if self.confinement.quota is not None and "Disk quota exceeded" in result.output:
            result.walls.append("disk")
        return result

    def _joined_cgroup(self) -> SandboxCgroup | None:
        """The sandbox's cgroup, taken on first use (a turn without tools needs none)."""
        cgroups = self.confinement.cgroups
        if self._cgroup is None and cgroups is not None and self.confinement.kind == "bubblewrap":
            self._cgroup = cgroups.acquire(self.spec.sandbox_id)
        return self._cgroup

    async def _network_path(self) -> str | None:
        if not self.spec.network or self.confinement.kind != "bubblewrap":
            return None
        networks = self.confinement.networks
        if networks is None:
            raise SandboxRefused(self.confinement.network_refusal() or "no private network")
        async with self._network_lock:
            if self._network is None:
                self._network = await networks.create()
        return self._network.path

    async def _spawn_file_service(self) -> asyncio.subprocess.Process:
        launch = self.confinement.launch(
            self.spec, [], cgroup=self._joined_cgroup(), file_service=True
        )
        return await spawn(
            launch,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            # Room for a few of the service's data frames (1 MiB each) before
            # the pipe is paused: fewer wake-ups per MB of a download.
            limit=4 << 20,
        )

    async def close(self) -> None:
        await self.files.close()
        network, self._network = self._network, None
        if network is not None:
            await network.close()
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            cgroup.release()
