"""Running commands in a workspace: output cap, timeout, process-group kill, clean env.

Each behaviour holds with and without bubblewrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid

from helpers import Box

from shared.sandbox.confinement import Confinement
from shared.sandbox.handle import OpenSandbox
from shared.sandbox.process import CommandResult
from shared.settings import Settings
from worker.tools import ToolContext, execute_tool


def _run(box: Box, command: str, timeout: float = 10, cap: int = 1000) -> CommandResult:
    async def run(sandbox: OpenSandbox) -> CommandResult:
        return await sandbox.run(command, timeout=timeout, output_cap=cap)

    return box.call(run)


def _alive(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


def test_output_is_capped_and_the_rest_counted(box: Box) -> None:
    result = _run(box, "head -c 50000000 /dev/zero | tr '\\0' y", cap=100)
    assert result.exit_code == 0
    assert result.output == "y" * 100
    assert result.omitted_bytes == 50_000_000 - 100


def test_stdout_and_stderr_are_combined_with_exit_code(box: Box) -> None:
    result = _run(box, "echo out; echo err >&2; exit 7")
    assert result.output == "out\nerr\n" and result.exit_code == 7 and not result.timed_out


def test_timeout_kills_the_whole_process_group(box: Box) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    command = f"(exec -a {marker} sleep 60) & (exec -a {marker} sleep 60)"
    result = _run(box, command, timeout=0.5)
    assert result.timed_out and result.exit_code is None
    assert time.monotonic() - started < 3
    time.sleep(0.2)
    assert _alive(marker) == []


def test_background_children_do_not_hold_the_call_open(box: Box) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = _run(box, f"echo before; (exec -a {marker} sleep 60) & echo after")
    assert result.exit_code == 0 and result.output == "before\nafter\n"
    assert time.monotonic() - started < 3
    time.sleep(0.2)
    assert _alive(marker) == []


def test_cancellation_kills_the_command(box: Box) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"

    async def scenario(sandbox: OpenSandbox) -> None:
        task = asyncio.create_task(
            sandbox.run(f"exec -a {marker} sleep 60", timeout=100, output_cap=10)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    box.call(scenario)
    time.sleep(0.2)
    assert _alive(marker) == []


def test_command_sees_a_scrubbed_environment(box: Box) -> None:
    os.environ["SANDSTREAM_TEST_SECRET"] = "hunter2"
    try:
        result = _run(box, "env")
    finally:
        del os.environ["SANDSTREAM_TEST_SECRET"]
    assert "hunter2" not in result.output and "SANDSTREAM" not in result.output
    assert "PATH=" in result.output


def test_bash_tool_reports_failures_as_errors(box: Box) -> None:
    failed = box.tool("bash", timeout=0.5, output_cap=20, command="echo nope; exit 3")
    assert failed.is_error and "[exit code 3]" in failed.content
    slow = box.tool("bash", timeout=0.5, output_cap=20, command="sleep 5")
    assert slow.is_error and "timed out" in slow.content
    long = box.tool("bash", timeout=0.5, output_cap=20, command="seq 1 1000")
    assert not long.is_error and "[output truncated:" in long.content
    assert box.tool("bash", cmd="ls").is_error
    assert box.tool("teleport").is_error


def test_refused_confinement_runs_nothing(box: Box) -> None:
    refused = Confinement(kind="refused", settings=Settings(), reason="bwrap not found")
    box = Box(refused, box.spec)

    async def run(sandbox: OpenSandbox) -> list[str]:
        ctx = ToolContext(sandbox=sandbox, timeout=5, output_cap=100)
        outcomes = [
            await execute_tool(ctx, "bash", {"command": "touch ran"}, ["bash"]),
            await execute_tool(ctx, "write_file", {"path": "ran", "content": ""}, ["write_file"]),
        ]
        return [o.content for o in outcomes if o.is_error]

    assert all("REFUSED" in content for content in box.call(run))
    assert not (box.workspace / "ran").exists()
