"""Running commands in a workspace: output cap, timeout, process-group kill, clean env."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from pathlib import Path

from worker.sandbox import run_command
from worker.tools import TOOLS, ToolContext, execute_tool


def _run(command: str, workspace: Path, timeout: float = 10, cap: int = 1000):  # type: ignore[no-untyped-def]
    return asyncio.run(run_command(command, workspace, timeout=timeout, output_cap=cap))


def _alive(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


def test_output_is_capped_and_the_rest_counted(tmp_path: Path) -> None:
    result = _run("head -c 50000000 /dev/zero | tr '\\0' y", tmp_path, cap=100)
    assert result.exit_code == 0
    assert result.output == "y" * 100
    assert result.omitted_bytes == 50_000_000 - 100


def test_stdout_and_stderr_are_combined_with_exit_code(tmp_path: Path) -> None:
    result = _run("echo out; echo err >&2; exit 7", tmp_path)
    assert result.output == "out\nerr\n" and result.exit_code == 7 and not result.timed_out


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = _run(
        f"(exec -a {marker} sleep 60) & (exec -a {marker} sleep 60)", tmp_path, timeout=0.5
    )
    assert result.timed_out and result.exit_code is None
    assert time.monotonic() - started < 3
    time.sleep(0.1)
    assert _alive(marker) == []


def test_background_children_do_not_hold_the_call_open(tmp_path: Path) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = _run(f"echo before; (exec -a {marker} sleep 60) & echo after", tmp_path)
    assert result.exit_code == 0 and result.output == "before\nafter\n"
    assert time.monotonic() - started < 3
    assert _alive(marker) == []


def test_cancellation_kills_the_command(tmp_path: Path) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        task = asyncio.create_task(
            run_command(f"exec -a {marker} sleep 60", tmp_path, timeout=100, output_cap=10)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert _alive(marker) == []


def test_command_sees_a_scrubbed_environment_and_the_workspace(tmp_path: Path) -> None:
    os.environ["SANDSTREAM_TEST_SECRET"] = "hunter2"
    try:
        result = _run("env; pwd", tmp_path)
    finally:
        del os.environ["SANDSTREAM_TEST_SECRET"]
    assert "hunter2" not in result.output and "SANDSTREAM" not in result.output
    assert result.output.rstrip().endswith(str(tmp_path))


def test_bash_tool_reports_failures_as_errors(tmp_path: Path) -> None:
    ctx = ToolContext(workspace=tmp_path, timeout=0.5, output_cap=20)

    def call(name: str, args: dict[str, object]):  # type: ignore[no-untyped-def]
        return asyncio.run(execute_tool(ctx, name, args, list(TOOLS)))

    failed = call("bash", {"command": "echo nope; exit 3"})
    assert failed.is_error and "[exit code 3]" in failed.content
    slow = call("bash", {"command": "sleep 5"})
    assert slow.is_error and "timed out" in slow.content
    long = call("bash", {"command": "seq 1 1000"})
    assert not long.is_error and "[output truncated:" in long.content
    assert call("bash", {"cmd": "ls"}).is_error
    assert call("teleport", {}).is_error
