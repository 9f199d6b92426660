"""Running a command in a sandbox workspace, confined as `worker.isolation` decides.

The command gets its own session and process group, so a timeout or an
interrupt can kill it together with everything it started. Output is read
while it runs and capped; what is past the cap is drained and counted, never
kept, so a command that prints gigabytes cannot fill the worker's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from pathlib import Path

import msgspec

from worker.isolation import Isolation, command_argv

_READ_CHUNK = 64 * 1024
_DRAIN_GRACE = 0.5


class CommandResult(msgspec.Struct, kw_only=True):
    exit_code: int | None
    output: str
    omitted_bytes: int
    timed_out: bool


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The exit status, as soon as the process itself exits.

    `Process.wait()` also waits for every pipe to close, which a child left in
    the background can hold off forever; a pidfd says when the process is gone.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        pidfd = -1  # exited and reaped already
    except (AttributeError, OSError):
        return await proc.wait()
    if pidfd >= 0:
        gone: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    # The event loop's child watcher reaps the process; its status follows shortly.
    while proc.returncode is None:
        await asyncio.sleep(0.002)
    return proc.returncode


async def run_command(
    command: str,
    workspace: Path,
    *,
    timeout: float,
    output_cap: int,
    isolation: Isolation,
    sandbox_id: str,
    network: bool = False,
) -> CommandResult:
    argv, env, cwd = command_argv(
        isolation,
        command,
        workspace,
        sandbox_id=sandbox_id,
        network=network,
        cpu_seconds=max(1, math.ceil(timeout)),
    )
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    kept = bytearray()
    omitted = 0

    async def collect() -> None:
        nonlocal omitted
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(_READ_CHUNK):
            room = output_cap - len(kept)
            kept.extend(chunk[:room])
            omitted += max(0, len(chunk) - room)

    reader = asyncio.create_task(collect())
    timed_out = False
    exit_code: int | None = None
    try:
        try:
            exit_code = await asyncio.wait_for(_exited(proc), timeout)
        except TimeoutError:
            timed_out = True
        else:
            # Children left in the background may hold the pipe open: take what
            # is already written, then stop reading.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), _DRAIN_GRACE)
    finally:
        # Runs on timeout, on interrupt (cancellation) and on normal exit alike:
        # whatever the command started dies with its process group.
        _kill_group(proc)
        # With the group dead the pipe closes; a process that left the group
        # could hold it open, so the wait is bounded.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), _DRAIN_GRACE)
        # Close our end of the pipes even if something outside the group holds
        # them; asyncio has no public call for it.
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            transport.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return CommandResult(
        exit_code=exit_code,
        output=kept.decode("utf-8", errors="replace"),
        omitted_bytes=omitted,
        timed_out=timed_out,
    )
