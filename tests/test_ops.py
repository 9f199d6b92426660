"""Ops endpoints and the worker check against a queue with known content."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from conftest import ADMIN_KEY, ROOT, RedisServer, Stack
from helpers import StreamReader, new_session, text_message, wait_state, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shared import keys


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

        (listed,) = admin.get("/ops/workers").json()
        assert listed["pid"] == worker.popen.pid and listed["host"] == os.uname().nodename
        assert listed["seconds_since_heartbeat"] < 2


def test_worker_check_exit_codes(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(worker_heartbeat_seconds="0.5")
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


def test_a_worker_stays_healthy_while_redis_is_full(own_redis: RedisServer, tmp_path: Path) -> None:
    """Redis at `maxmemory` refuses writes, not the worker's heartbeat: the check
    (a liveness probe) keeps answering healthy, so the probe does not restart a
    healthy worker and end its turns (before: unhealthy after three heartbeats)."""
    stack = Stack(own_redis.url, tmp_path / "stack", {"SANDSTREAM_WORKER_HEARTBEAT_SECONDS": "0.3"})
    try:
        pid = str(stack.workers[0].popen.pid)
        assert _check(stack, "--pid", pid).returncode == 0
        store = own_redis.client()
        store.config_set("maxmemory", 1)  # noeviction: every write that needs memory fails
        try:
            time.sleep(1.5)  # five heartbeats
            result = _check(stack, "--pid", pid)
        finally:
            store.config_set("maxmemory", 0)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stack.stop()


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
    queues = _cli("queues", "--url", stack.base_url, "--key", ADMIN_KEY)
    assert queues.returncode == 0, queues.stderr
    header, row = queues.stdout.splitlines()[:2]
    assert header.split()[:3] == ["queue", "queued", "deferred"]
    assert row.split()[:2] == ["ss:queue", "0"]
    workers = _cli("workers", "--url", stack.base_url, "--key", ADMIN_KEY)
    assert workers.returncode == 0 and str(stack.workers[0].popen.pid) in workers.stdout
    refused = _cli("queues", "--url", stack.base_url, "--key", "not-an-admin-key-000000")
    assert refused.returncode == 1 and "401" in refused.stderr


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(stack: Stack) -> Samples:
    """/metrics as {(sample name, labels): value}, parsed by prometheus_client."""
    with _admin(stack) as admin:
        response = admin.get(stack.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_happened(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(turn_timeout_seconds="1.5", worker_heartbeat_seconds="0.5")
    with stack.client() as client:
        plain, tools = new_session(client), new_session(client)
        for text in ("one", "two", "three"):
            assert (
                client.post(f"/sessions/{plain}/messages", json=text_message(text)).status_code
                == 200
            )
        ran = client.post(f"/sessions/{tools}/messages", json=text_message("run: echo hi"))
        assert ran.json()["content"][-1]["type"] == "text"
        slow = client.post(f"/sessions/{tools}/messages", json=text_message("run: sleep 5"))
        assert slow.json()["stop_reason"] == "timeout"
        reader = StreamReader(client, plain)
        # The gauge rises when the stream's body starts, just after its head.
        wait_until(
            lambda: _value(_scrape(stack), "sandstream_sse_connections") == 1, 10, "the stream"
        )
        during = _scrape(stack)
        client.post(f"/sessions/{plain}/messages", json=text_message("bye"))
        reader.join()
    time.sleep(0.3)
    after = _scrape(stack)
    store = redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"])
    appended = sum(int(store.get(keys.seq(sid)) or 0) for sid in (plain, tools))

    assert _value(during, "sandstream_sse_connections") == 1
    assert _value(after, "sandstream_sse_connections") == 0
    assert _value(after, "sandstream_turns_started_total") == 6
    assert _value(after, "sandstream_turns_completed_total", reason="end_turn") == 5
    assert _value(after, "sandstream_turns_failed_total", reason="turn_timeout") == 1
    assert _value(after, "sandstream_events_published_total") == appended
    assert _value(after, "sandstream_turn_duration_seconds_count") == 6
    assert _value(after, "sandstream_turn_duration_seconds_bucket", le="+Inf") == 6
    assert _value(after, "sandstream_turn_duration_seconds_sum") >= 1.5
    assert _value(after, "sandstream_time_to_first_token_seconds_count") == 5
    assert _value(after, "sandstream_tool_duration_seconds_count", tool="bash") == 1
    assert _value(after, "sandstream_workers_alive") == 1
    assert _value(after, "sandstream_queue_depth", queue="ss:queue") == 0
    assert _value(after, "sandstream_turns_running") == 0
    sends = {
        labels: value
        for (name, labels), value in after.items()
        if name == "sandstream_http_requests_total"
        and ("method", "POST") in labels
        and any(k == "path" and v.endswith("/messages") for k, v in labels)
    }
    assert sum(sends.values()) == 6, sends
    # Routes are labelled by template, never by a session's id; streams are
    # counted by the gauge above, not timed as requests.
    assert not any(plain in str(labels) for _, labels in after)
    assert not any(
        name.startswith("sandstream_http_") and ("path", "/api/v1/sessions/{sid}/stream") in labels
        for name, labels in after
    )


def test_metrics_add_up_across_uvicorn_worker_processes(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """With several processes on one port, a scrape lands on any of them and must
    still report every process's requests."""
    directory = tmp_path / "prometheus"
    stack = make_stack(api_workers="2", env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    with stack.client() as client:
        new_session(client)
    for _ in range(30):  # a new connection each: the kernel spreads them
        assert httpx.get(stack.base_url + "/healthz").status_code == 200
    pids = {path.stem.rsplit("_", 1)[1] for path in directory.glob("*.db")}
    assert len(pids) == 2, pids
    for _ in range(6):
        samples = _scrape(stack)
        healthz = {"app_name": "sandstream", "method": "GET", "path": "/healthz"}
        assert _value(samples, "sandstream_http_requests_total", **healthz, status_code="200") == 30
