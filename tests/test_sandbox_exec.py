"""Running commands in a workspace: output cap, timeout, process-group kill, clean env.

Each behaviour holds with and without bubblewrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from worker.isolation import Isolation, own_workspace
from worker.sandbox import CommandResult, run_command
from worker.tools import TOOLS, ToolContext, ToolOutcome, execute_tool

KINDS = ["none"] + (["bubblewrap"] if shutil.which("bwrap") else [])


@pytest.fixture(params=KINDS)
def box(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Isolation, Path, str]:
    isolation = Isolation(kind=request.param)
    sandbox_id = str(uuid.uuid4())
    workspace = tmp_path / "ws"
    workspace.mkdir()
    own_workspace(isolation, workspace, sandbox_id)
    return isolation, workspace, sandbox_id


def _run(
    box: tuple[Isolation, Path, str], command: str, timeout: float = 10, cap: int = 1000
) -> CommandResult:
    isolation, workspace, sandbox_id = box
    return asyncio.run(
        run_command(
            command,
            workspace,
            timeout=timeout,
            output_cap=cap,
            isolation=isolation,
            sandbox_id=sandbox_id,
        )
    )


def _alive(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


def test_output_is_capped_and_the_rest_counted(box: tuple[Isolation, Path, str]) -> None:
    result = _run(box, "head -c 50000000 /dev/zero | tr '\\0' y", cap=100)
    assert result.exit_code == 0
    assert result.output == "y" * 100
    assert result.omitted_bytes == 50_000_000 - 100


def test_stdout_and_stderr_are_combined_with_exit_code(box: tuple[Isolation, Path, str]) -> None:
    result = _run(box, "echo out; echo err >&2; exit 7")
    assert result.output == "out\nerr\n" and result.exit_code == 7 and not result.timed_out


def test_timeout_kills_the_whole_process_group(box: tuple[Isolation, Path, str]) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    command = f"(exec -a {marker} sleep 60) & (exec -a {marker} sleep 60)"
    result = _run(box, command, timeout=0.5)
    assert result.timed_out and result.exit_code is None
    assert time.monotonic() - started < 3
    time.sleep(0.2)
    assert _alive(marker) == []


def test_background_children_do_not_hold_the_call_open(box: tuple[Isolation, Path, str]) -> None:
    marker = f"ss-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = _run(box, f"echo before; (exec -a {marker} sleep 60) & echo after")
    assert result.exit_code == 0 and result.output == "before\nafter\n"
    assert time.monotonic() - started < 3
    time.sleep(0.2)
    assert _alive(marker) == []


def test_cancellation_kills_the_command(box: tuple[Isolation, Path, str]) -> None:
    isolation, workspace, sandbox_id = box
    marker = f"ss-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        task = asyncio.create_task(
            run_command(
                f"exec -a {marker} sleep 60",
                workspace,
                timeout=100,
                output_cap=10,
                isolation=isolation,
                sandbox_id=sandbox_id,
            )
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    time.sleep(0.2)
    assert _alive(marker) == []


def test_command_sees_a_scrubbed_environment(box: tuple[Isolation, Path, str]) -> None:
    os.environ["SANDSTREAM_TEST_SECRET"] = "hunter2"
    try:
        result = _run(box, "env")
    finally:
        del os.environ["SANDSTREAM_TEST_SECRET"]
    assert "hunter2" not in result.output and "SANDSTREAM" not in result.output
    assert "PATH=" in result.output


def test_bash_tool_reports_failures_as_errors(box: tuple[Isolation, Path, str]) -> None:
    isolation, workspace, sandbox_id = box
    ctx = ToolContext(
        workspace=workspace, timeout=0.5, output_cap=20, isolation=isolation, sandbox_id=sandbox_id
    )

    def call(name: str, args: dict[str, object]) -> ToolOutcome:
        return asyncio.run(execute_tool(ctx, name, args, list(TOOLS)))

    failed = call("bash", {"command": "echo nope; exit 3"})
    assert failed.is_error and "[exit code 3]" in failed.content
    slow = call("bash", {"command": "sleep 5"})
    assert slow.is_error and "timed out" in slow.content
    long = call("bash", {"command": "seq 1 1000"})
    assert not long.is_error and "[output truncated:" in long.content
    assert call("bash", {"cmd": "ls"}).is_error
    assert call("teleport", {}).is_error


def test_refused_isolation_runs_nothing(tmp_path: Path) -> None:
    ctx = ToolContext(
        workspace=tmp_path,
        timeout=5,
        output_cap=100,
        isolation=Isolation(kind="refused", reason="bwrap not found"),
        sandbox_id=str(uuid.uuid4()),
    )
    outcome = asyncio.run(execute_tool(ctx, "bash", {"command": "touch ran"}, ["bash"]))
    assert outcome.is_error and "REFUSED" in outcome.content
    assert not (tmp_path / "ran").exists()
