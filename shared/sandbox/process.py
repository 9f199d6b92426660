"""Starting confined processes, and running a command to its end.

A command gets its own session and process group, so a timeout or an
interrupt can kill it together with everything it started (under bubblewrap,
killing bubblewrap ends the sandbox's whole pid namespace). Output is read
while it runs and capped; what is past the cap is drained and counted, never
kept, so a command that prints gigabytes cannot fill the worker's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import msgspec

_READ_CHUNK = 64 * 1024
_DRAIN_GRACE = 0.5


class Launch(msgspec.Struct, kw_only=True):
    """How to start one confined process: argv, environment, and the file
    descriptors it inherits (closed in the parent once it started)."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    pass_fds: tuple[int, ...] = ()


class CommandResult(msgspec.Struct, kw_only=True):
    exit_code: int | None
    output: str
    omitted_bytes: int
    timed_out: bool
    walls: list[str] = msgspec.field(default_factory=list)  # limits it ran into


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def spawn(launch: Launch, **pipes: Any) -> asyncio.subprocess.Process:
    """Start a confined process in a session of its own; the descriptors it
    inherits are closed here once it has them."""
    try:
        return await asyncio.create_subprocess_exec(
            *launch.argv,
            cwd=launch.cwd,
            env=launch.env,
            start_new_session=True,
            pass_fds=launch.pass_fds,
            **pipes,
        )
    finally:
        for fd in launch.pass_fds:
            os.close(fd)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and its whole group, and let go of its pipes."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    # With the group dead the pipes close; a process that left the group
    # could hold them open, so the wait is bounded.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), _DRAIN_GRACE)
    # Close our end of the pipes even if something outside the group holds
    # them; asyncio has no public call for it.
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


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


async def run_command(launch: Launch, *, timeout: float, output_cap: int) -> CommandResult:
    proc = await spawn(
        launch,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
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
        await stop(proc)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return CommandResult(
        exit_code=exit_code,
        output=kept.decode("utf-8", errors="replace"),
        omitted_bytes=omitted,
        timed_out=timed_out,
    )
