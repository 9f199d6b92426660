"""Ops endpoints and the worker check against a queue with known content."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
from conftest import ADMIN_KEY, ROOT, Stack
from helpers import new_session, text_message, wait_state


def _admin(stack: Stack) -> httpx.Client:
    return stack.client(ADMIN_KEY)


def _check(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "check", *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_queue_report_follows_jobs_from_queued_to_drained(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(workers=0, worker_heartbeat_seconds="0.5")
    with stack.client() as client, _admin(stack) as admin:
        sessions = [new_session(client) for _ in range(3)]
        for sid in sessions:
            reply = client.post(
                f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("hi")
            )
            assert reply.status_code == 202
        time.sleep(0.3)
        (queue,) = admin.get("/ops/queues").json()
        assert queue["queued"] == 3 and queue["in_progress"] == 0 and queue["deferred"] == 0
        assert queue["oldest_queued_seconds"] >= 0.3
        assert queue["running_turns"] == 3
        assert admin.get("/ops/workers").json() == []

        worker = stack.start_worker()
        for sid in sessions:
            wait_state(client, sid, "active")
        (queue,) = admin.get("/ops/queues").json()
        assert queue["queued"] == 0 and queue["running_turns"] == 0
        assert queue["turns_last_hour"]["session_completed:end_turn"] == 3
        assert queue["turn_duration_ms"]["count"] == 3

        time.sleep(0.6)
        (listed,) = admin.get("/ops/workers").json()
        assert listed["pid"] == worker.popen.pid and listed["host"] == os.uname().nodename
        assert listed["seconds_since_heartbeat"] < 2


def test_worker_check_exit_codes(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(worker_heartbeat_seconds="0.5")
    time.sleep(0.6)
    pid = str(stack.workers[0].popen.pid)
    assert _check(stack).returncode == 0
    assert _check(stack, "--pid", pid).returncode == 0
    assert _check(stack, "--pid", "1").returncode == 1
    stack.workers[0].stop(signal.SIGKILL)
    time.sleep(2.0)  # three heartbeats missed
    assert _check(stack, "--pid", pid).returncode == 1
    down = {**stack.env, "SANDSTREAM_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "check"],
        cwd=ROOT,
        env=down,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "ops", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ops_cli_prints_queues_and_workers(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(worker_heartbeat_seconds="0.5")
    time.sleep(0.6)
    queues = _cli("queues", "--url", stack.base_url, "--key", ADMIN_KEY)
    assert queues.returncode == 0, queues.stderr
    header, row = queues.stdout.splitlines()[:2]
    assert header.split()[:3] == ["queue", "queued", "deferred"]
    assert row.split()[:2] == ["ss:queue", "0"]
    workers = _cli("workers", "--url", stack.base_url, "--key", ADMIN_KEY)
    assert workers.returncode == 0 and str(stack.workers[0].popen.pid) in workers.stdout
    refused = _cli("queues", "--url", stack.base_url, "--key", "not-an-admin-key-000000")
    assert refused.returncode == 1 and "401" in refused.stderr
