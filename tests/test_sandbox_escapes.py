"""Escape attempts through the agent's `bash` tool, end to end: all contained.

The demo agent runs whatever follows `run: `, so each test is what a hostile or
confused model could do. The stack's worker runs tools under bubblewrap.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import ANTHROPIC_TEST_KEY, Stack
from helpers import run_in_sandbox as run
from helpers import wait_until

pytestmark = pytest.mark.skipif(not shutil.which("bwrap"), reason="needs bubblewrap")


def test_writes_outside_the_workspace_fail(
    client: httpx.Client, session_id: str, sandbox_id: str, stack: Stack
) -> None:
    result = run(
        client,
        session_id,
        "echo x > /etc/pwned; echo x > ../pwned; echo x > ../../pwned; touch /usr/pwned;"
        " echo x > /tmp/inside-only; ls /tmp",
    )
    assert "Read-only file system" in result["content"] or "denied" in result["content"]
    root = stack.workdir / "sandboxes"
    assert not Path("/etc/pwned").exists() and not Path("/usr/pwned").exists()
    assert not (root / "pwned").exists() and not (root.parent / "pwned").exists()
    assert not Path("/tmp/inside-only").exists()  # its /tmp was private


def test_service_environment_and_secrets_are_out_of_reach(
    client: httpx.Client, session_id: str
) -> None:
    result = run(
        client,
        session_id,
        "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; ls /root /work 2>&1; "
        "ps -eo pid,user,args 2>&1 | head -20",
    )
    content = result["content"]
    assert ANTHROPIC_TEST_KEY not in content and "SECRET" not in content
    assert "SANDSTREAM_" not in content and "REDIS" not in content
    assert "python -m worker" not in content and "python -m api" not in content


@pytest.mark.parametrize("target", ["api", "redis"])
def test_no_network_without_permission(
    client: httpx.Client, session_id: str, stack: Stack, target: str
) -> None:
    port = stack.port if target == "api" else urlparse(stack.env["SANDSTREAM_REDIS_URL"]).port
    result = run(client, session_id, f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED")
    assert result["is_error"] is True and "CONNECTED" not in result["content"]


def _sandbox_processes(stack: Stack, sandbox_id: str) -> list[str]:
    """The sandbox's processes but its file service (kept warm between turns)."""
    uid = (stack.workdir / "sandboxes" / sandbox_id).stat().st_uid
    assert uid != 0
    out = subprocess.run(["pgrep", "-a", "-u", str(uid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "fileservice.server" not in line]


def test_fork_bomb_is_contained_and_cleaned_up(
    client: httpx.Client, session_id: str, sandbox_id: str, stack: Stack
) -> None:
    started = time.monotonic()
    result = run(client, session_id, "bomb() { bomb | bomb & }; bomb; sleep 30")
    assert result["is_error"] is True
    assert time.monotonic() - started < 15
    wait_until(lambda: not _sandbox_processes(stack, sandbox_id), 10, "the processes to be gone")
    assert _sandbox_processes(stack, sandbox_id) == []
    assert run(client, session_id, "echo still-working")["content"] == "still-working\n"


def test_process_ignoring_sigterm_is_killed(
    client: httpx.Client, session_id: str, sandbox_id: str, stack: Stack
) -> None:
    result = run(client, session_id, "trap '' TERM; (trap '' TERM; sleep 60) & sleep 60")
    assert result["is_error"] is True and "timed out" in result["content"]
    wait_until(lambda: not _sandbox_processes(stack, sandbox_id), 10, "the processes to be gone")
    assert _sandbox_processes(stack, sandbox_id) == []


def test_fifty_megabytes_of_output_are_capped(client: httpx.Client, session_id: str) -> None:
    result = run(client, session_id, "head -c 50000000 /dev/zero | tr '\\0' a")
    assert result["is_error"] is False
    assert len(result["content"]) < 70_000
    assert "[output truncated:" in result["content"]


def test_memory_and_file_size_are_limited(client: httpx.Client, session_id: str) -> None:
    memory = run(client, session_id, "python3 -c 'x = bytearray(3 << 30)' && echo ALLOCATED")
    assert memory["is_error"] is True and "ALLOCATED" not in memory["content"]
    big = run(client, session_id, "head -c 300000000 /dev/zero > big && echo WROTE")
    assert big["is_error"] is True and "WROTE" not in big["content"]


def test_command_runs_as_an_unprivileged_user(client: httpx.Client, session_id: str) -> None:
    result = run(client, session_id, "id -u; cat /etc/shadow")
    uid = int(result["content"].splitlines()[0])
    assert uid != 0 and result["is_error"] is True
