"""Leases that measure the worker, not Redis: stalls, pauses, partitions and a full store.

Real Redis, API and worker processes. Leases are short here (1 s, grace 3 s or
1 s) so each case runs in seconds; README (Reliability) gives the argument with
the defaults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from arq.constants import in_progress_key_prefix
from arq.jobs import serialize_result
from conftest import Proc, RedisServer, Stack, model_env
from fake_llm import FakeLLM, Reply, anthropic_stream
from helpers import PausableProxy, new_session, text_message, wait_state
from redis.exceptions import OutOfMemoryError

from bench.harness import user_message
from shared import keys
from shared.models import new_id
from shared.queue import TurnJob, connect, deserialize_job_data, queued_job, serialize_job_data
from shared.settings import Settings
from shared.store import SessionStore
from worker.runtime import WorkerRuntime, job_in_progress_ms

# lease 1 s, grace 3 s: a worker fences after 4 s without a renewal, a reaper
# ends a turn whose lease stood still for 4.33 s.
RIDE_OUT = {
    "SANDSTREAM_LEASE_SECONDS": "1",
    "SANDSTREAM_LEASE_GRACE_SECONDS": "3",
    "SANDSTREAM_REAPER_INTERVAL_SECONDS": "0.2",
    "SANDSTREAM_REDIS_SOCKET_TIMEOUT_SECONDS": "0.3",
}


def _started_by(store: redis.Redis, sid: str, timeout: float = 15) -> str:
    """The id of the worker that started the session's turn, once one has."""
    deadline = time.monotonic() + timeout
    while not (worker := store.hget(keys.session(sid), "started")):
        assert time.monotonic() < deadline, "no worker started the turn"
        time.sleep(0.02)
    return str(worker.decode())


def _wait_for_event(store: redis.Redis, sid: str, event_type: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not any(f[b"t"] == event_type.encode() for _, f in store.xrange(keys.log(sid))):
        assert time.monotonic() < deadline, f"no {event_type} event"
        time.sleep(0.02)


def _send(client: httpx.Client, sid: str, command: str) -> str:
    accepted = client.post(
        f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message(f"run: {command}")
    )
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["turn_id"])


def _reply(client: httpx.Client, sid: str, timeout: float = 15) -> dict[str, Any]:
    message: dict[str, Any] = wait_state(client, sid, "active", timeout)["messages"][-1]
    return message


def _stop_for(pid: int, seconds: float) -> None:
    """SIGSTOP the process for `seconds`, then SIGCONT it (also on failure)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_reaper_ends_a_turn_a_third_of_a_lease_after_its_worker_fenced_it() -> None:
    settings = Settings(lease_seconds=3, lease_grace_seconds=6)
    assert settings.fence_after_seconds() == 9
    assert settings.lost_after_seconds() == 10


def test_a_redis_stall_longer_than_the_lease_ends_no_turn(
    own_redis: RedisServer, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(redis_url_override=own_redis.url, env=RIDE_OUT)
    store = own_redis.client()
    with stack.client() as client:
        sid = new_session(client)
        _send(client, sid, "sleep 2.5; echo survived")
        _started_by(store, sid)
        assert own_redis.proc is not None
        stall = 2.0  # twice the lease; Redis's clock runs on meanwhile
        _stop_for(own_redis.proc.pid, stall)
        reply = _reply(client, sid)
    print(f"Redis stopped {stall:.1f} s with a 1 s lease: the turn ended {reply['stop_reason']}")
    assert reply["stop_reason"] == "end_turn"
    assert reply["content"][1]["content"] == "survived\n"


def test_a_worker_paused_past_its_lease_resumes_its_turn(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(workers=2, env=RIDE_OUT)
    store = redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"])
    with stack.client() as client:
        sid = new_session(client)
        _send(client, sid, "sleep 2.5; echo resumed")
        pid = int(_started_by(store, sid).split(":")[1])
        assert pid in [w.popen.pid for w in stack.workers]
        pause = 2.0  # twice the lease; the other worker's reaper runs throughout
        _stop_for(pid, pause)
        reply = _reply(client, sid)
    print(f"worker stopped {pause:.1f} s with a 1 s lease: the turn ended {reply['stop_reason']}")
    assert reply["stop_reason"] == "end_turn"
    assert reply["content"][1]["content"] == "resumed\n"


def test_a_partitioned_worker_kills_its_tool_before_the_session_moves_on(
    make_stack: Callable[..., Stack],
) -> None:
    # lease 1 s, grace 1 s: the cut-off worker fences 2 s after its last
    # renewal, the other worker's reaper may end the turn 2.33 s after it saw
    # that renewal.
    settings = {**RIDE_OUT, "SANDSTREAM_LEASE_GRACE_SECONDS": "1"}
    stack = make_stack(workers=0, env=settings)
    url = stack.env["SANDSTREAM_REDIS_URL"]
    host_port, db = url.rsplit("/", 1)
    proxy = PausableProxy(int(host_port.rsplit(":", 1)[1]))
    cut_off = Proc(
        [sys.executable, "-m", "worker"],
        {**stack.env, "SANDSTREAM_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/{db}"},
        stack.workdir / "worker-partitioned.log",
    )
    store = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 15
        while not any(
            f":{cut_off.popen.pid}:".encode() in w for w in store.zrange(keys.WORKERS, 0, -1)
        ):
            assert time.monotonic() < deadline and cut_off.popen.poll() is None
            time.sleep(0.05)
        with stack.client() as client:
            sid = new_session(client)
            sandbox = client.get(f"/sessions/{sid}").json()["sandbox_id"]
            marker = stack.workdir / "sandboxes" / sandbox / "marker"
            _send(client, sid, "sleep 4; touch marker")
            assert f":{cut_off.popen.pid}:" in _started_by(store, sid)
            _wait_for_event(store, sid, "tool_use_complete")  # the command runs now
            proxy.cut()
            cut_at = time.monotonic()
            stack.start_worker()  # reaches Redis directly; its reaper watches the lease
            wait_state(client, sid, "active", timeout=20)
            reaped_after = time.monotonic() - cut_at
            _, fields = store.xrevrange(keys.log(sid), count=1)[0]
            lost = json.loads(fields[b"d"])
            assert (lost["type"], lost["stop_reason"]) == ("session_failed", "worker_lost"), lost
            # The session's next turn runs, on the worker that reaches Redis.
            reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: ls -a"))
            assert reply.status_code == 200, reply.text
            assert reply.json()["stop_reason"] == "end_turn"
            assert "marker" not in reply.json()["content"][1]["content"]
            # Well past the moment the lost command would have touched it.
            time.sleep(max(0.0, cut_at + 5.5 - time.monotonic()))
            assert not marker.exists(), "the lost turn's command ran on after the cut"
        log = cut_off.log.read_text()
        assert "no lease renewal for" in log
        fenced_after = float(log.split("no lease renewal for ", 1)[1].split(" s", 1)[0])
        print(
            f"partition: the cut-off worker fenced {fenced_after:.2f} s after its last renewal; "
            f"the turn was reaped {reaped_after:.2f} s after the cut"
        )
    finally:
        cut_off.stop(signal.SIGKILL)
        proxy.stop()


def test_a_turn_that_ends_while_redis_is_full_is_stored_complete(
    own_redis: RedisServer, make_stack: Callable[..., Stack]
) -> None:
    stack = make_stack(redis_url_override=own_redis.url, env=RIDE_OUT)
    store = own_redis.client()
    with stack.client() as client:
        sid = new_session(client)
        turn_id = _send(client, sid, "sleep 1; echo stored")
        _started_by(store, sid)
        store.config_set("maxmemory", 1)  # noeviction: every write that needs memory fails
        full_at = time.monotonic()
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            store.set("probe", "x")
        time.sleep(2.5)  # the tool ends after 1 s: the turn's end meets a full store
        assert store.hget(keys.session(sid), "state") == b"running"
        store.config_set("maxmemory", 0)
        full_for = time.monotonic() - full_at
        reply = _reply(client, sid)
    print(f"Redis full for {full_for:.1f} s: the turn was stored {reply['stop_reason']}")
    assert reply["stop_reason"] == "end_turn"
    assert reply["turn_id"] == turn_id
    assert [b["type"] for b in reply["content"]] == ["tool_use", "tool_result", "text"]
    assert reply["content"][1]["content"] == "stored\n"
    worker_log = "".join(p.log.read_text() for p in stack.workers)
    # The turn met the full store (its last events or its end were refused).
    assert "the store refused" in worker_log


def test_a_turn_that_cannot_begin_while_redis_is_full_fails_with_its_cause(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The turn's workspace cannot be prepared, and Redis is full as the worker
    ends the turn for that: the end is asked again until Redis takes it, and the
    session fails at once with `sandbox_unavailable` (before: the refused end
    escaped the job, and the session stayed running until a reaper ended it as
    `worker_lost`, some 50 s later with the default lease)."""
    root = tmp_path / "sandboxes"

    async def oom_refusals(client: redis.asyncio.Redis) -> int:
        count: int = (await client.info("errorstats")).get("errorstat_OOM", {}).get("count", 0)
        return count

    async def scenario() -> None:
        redis_client = await connect(own_redis.url)
        settings = Settings.from_env(
            {"SANDSTREAM_SANDBOX_ROOT": str(root), "SANDSTREAM_PROVIDER": "demo"}
        )
        runtime = WorkerRuntime(redis_client, settings)
        store = runtime.store
        # Between the turn's start and its end the worker only reads from Redis,
        # within a millisecond: to fill Redis in between, the worker's two
        # workspace threads are kept busy (as a slow disk would), so the started
        # turn waits for one to prepare its workspace; the test frees them once
        # Redis is full. Nothing of the worker's own code is replaced.
        gate = threading.Event()
        loop = asyncio.get_running_loop()
        busy = [loop.run_in_executor(runtime._disk, gate.wait, 30) for _ in range(2)]
        running: asyncio.Task[bool] | None = None
        try:
            sandbox = await store.create_sandbox("t", {})
            sid = (await store.create_session("t", sandbox.id, {}, settings.default_agent())).id
            turn = new_id()
            job = TurnJob(session_id=sid, turn_id=turn)
            user = user_message(sid, turn, "go")
            assert (await store.claim_turn(sid, "t", turn, user, queued_job(job))).status == "ok"
            # The workspaces' volume is gone: no workspace can be made under it.
            if root.is_dir():
                root.rmdir()
            root.write_text("")
            running = asyncio.create_task(runtime.run_turn(job))
            deadline = time.monotonic() + 10
            while await redis_client.hget(keys.session(sid), "started") is None:
                assert time.monotonic() < deadline and not running.done(), "no start"
                await asyncio.sleep(0.02)
            await redis_client.config_set("maxmemory", 1)  # noeviction: writes fail
            with pytest.raises(OutOfMemoryError):
                await redis_client.set("probe", "x")
            refused = await oom_refusals(redis_client)
            gate.set()
            deadline = time.monotonic() + 10
            while not running.done() and await oom_refusals(redis_client) == refused:
                assert time.monotonic() < deadline, "the turn's end was not attempted"
                await asyncio.sleep(0.02)
            state = await redis_client.hget(keys.session(sid), "state")
            await redis_client.config_set("maxmemory", 0)
            lifted_at = time.monotonic()
            assert state == b"running"
            assert await asyncio.wait_for(running, 10) is True
            ended_after = time.monotonic() - lifted_at
            assert await redis_client.hget(keys.session(sid), "state") == b"active"
            [(_, fields)] = await redis_client.xrevrange(keys.log(sid), count=1)
            end = json.loads(fields[b"d"])
            assert (end["type"], end["error"]["code"]) == ("session_failed", "sandbox_unavailable")
            print(f"Redis full as the turn could not begin: it ended {ended_after:.2f} s after")
        finally:
            gate.set()
            if running is not None and not running.done():
                running.cancel()
            await asyncio.gather(*busy, *([running] if running else []), return_exceptions=True)
            await redis_client.config_set("maxmemory", 0)
            await runtime.events.close()
            await redis_client.aclose()

    asyncio.run(scenario())


def test_a_job_that_raised_a_store_error_gets_its_result_stored() -> None:
    """arq stores a failed job's exception as its result; it must encode."""
    encoded = serialize_result(
        "run_turn",
        ({},),
        {},
        1,
        0,
        False,
        OutOfMemoryError("OOM command not allowed"),
        0,
        1,
        "job",
        keys.QUEUE,
        "job",
        serializer=serialize_job_data,
    )
    assert encoded is not None
    result = deserialize_job_data(encoded)["r"]
    assert result == "OutOfMemoryError: OOM command not allowed"


def test_a_turn_that_begins_to_wait_while_redis_is_full_waits_once_it_is_not(
    own_redis: RedisServer, make_stack: Callable[..., Stack], fake_llm: FakeLLM
) -> None:
    """The model asks for a call that needs approval while Redis is full: the
    suspension is asked again until Redis takes it, and the turn then waits for
    the decision (before: the refused suspension failed the turn with
    `internal_error`)."""
    model = f"full-store-{time.monotonic_ns()}"
    env = {
        **RIDE_OUT,
        # Redis is full for 2 s: a grace of 6 s (not 3) leaves a loaded machine's
        # worker room to renew after it, lest it fence the turn itself.
        "SANDSTREAM_LEASE_GRACE_SECONDS": "6",
        **model_env(fake_llm),
        # Made at start-up: the SDK's import during the turn can keep a loaded
        # machine's worker from renewing its short lease (test_approval_seams).
        "SANDSTREAM_PROVIDER": "anthropic",
        "SANDSTREAM_MODEL": model,
    }
    stack = make_stack(redis_url_override=own_redis.url, env=env)
    call = ("tool", "toolu_full", "bash", {"command": "echo approved"})
    # The call's last event is appended 0.8 s before the response ends.
    fake_llm.script(model, Reply(chunks=anthropic_stream(call, stop="tool_use"), delay=0.4))
    store = own_redis.client()
    with stack.client() as client:
        sandbox = client.post("/sandboxes", json={}).json()["id"]
        agent = {"provider": "anthropic", "model": model, "permissions": {"bash": "ask"}}
        created = client.post(f"/sandboxes/{sandbox}/sessions", json={"agent": agent})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        _send(client, sid, "echo approved")
        _wait_for_event(store, sid, "tool_use_complete")
        store.config_set("maxmemory", 1)  # noeviction: every write that needs memory fails
        full_at = time.monotonic()
        time.sleep(2.0)  # the response ends, and the turn would wait, meanwhile
        state = store.hget(keys.session(sid), "state")
        store.config_set("maxmemory", 0)
        print(f"Redis full for {time.monotonic() - full_at:.1f} s as the turn began to wait")
        assert state == b"running"
        session = wait_state(client, sid, "awaiting_approval", 10)
        assert [p["tool_use_id"] for p in session["pending_approvals"]] == ["toolu_full"]
        worker_log = "".join(p.log.read_text() for p in stack.workers)
        assert "the store refused the suspension" in worker_log


class _CountingConnection(redis.asyncio.Connection):
    """A connection that counts what it writes to Redis: one write a round trip
    (a single command or a whole pipeline)."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


async def _queued_turns(
    store: SessionStore, settings: Settings, count: int
) -> list[tuple[str, str]]:
    """`count` sessions, each with a turn claimed and its job queued: (sid, turn)."""
    sandbox = await store.create_sandbox("t", {})
    claimed = []
    for _ in range(count):
        sid = (await store.create_session("t", sandbox.id, {}, settings.default_agent())).id
        turn = new_id()
        job = queued_job(TurnJob(session_id=sid, turn_id=turn))
        user = user_message(sid, turn, "go")
        assert (await store.claim_turn(sid, "t", turn, user, job)).status == "ok"
        claimed.append((sid, turn))
    return claimed


async def _counting_writes(client: redis.asyncio.Redis) -> Callable[[], int]:
    """From here on, `client` makes new connections that count their writes:
    how many it made since (one a round trip)."""
    pool = client.connection_pool
    await pool.disconnect()
    pool.reset()  # type: ignore[no-untyped-call]
    pool.connection_class = _CountingConnection
    before = _CountingConnection.writes
    return lambda: _CountingConnection.writes - before


def test_a_reaper_pass_reads_all_running_sessions_in_one_round_trip(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """150 turns whose worker is gone: a pass reads their leases in one round trip
    (before: one each), and a pass a lease's standstill later ends them all."""
    count = 150

    async def scenario() -> None:
        redis_client = await connect(own_redis.url)
        settings = Settings.from_env(
            {
                "SANDSTREAM_LEASE_SECONDS": "0.3",
                "SANDSTREAM_LEASE_GRACE_SECONDS": "0.3",
                "SANDSTREAM_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
            }
        )
        runtime = WorkerRuntime(redis_client, settings)
        store = runtime.store
        try:
            claimed = await _queued_turns(store, settings, count)
            for sid, turn in claimed:
                assert await store.start_turn(sid, turn, "gone")
            sids = [sid for sid, _ in claimed]
            writes = await _counting_writes(redis_client)
            assert await runtime.reap_once() == 0
            # The overdue approvals, the running index, the leases (and the new
            # connection's handshake): a few, not one a session.
            assert writes() <= 10, writes()
            assert set(runtime._seen) == set(sids)
            await asyncio.sleep(settings.lost_after_seconds() + 0.1)
            assert await runtime.reap_once() == count
            for sid in sids:
                [(_, fields)] = await redis_client.xrevrange(keys.log(sid), count=1)
                end = json.loads(fields[b"d"])
                assert (end["type"], end["stop_reason"]) == ("session_failed", "worker_lost")
        finally:
            await runtime.events.close()
            await redis_client.aclose()

    asyncio.run(scenario())


def test_a_reaper_pass_reads_the_queued_turns_jobs_in_one_round_trip(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """150 turns not started: 50 only queued, 50 whose job a worker took just
    now, 50 whose job a worker took longer ago than a lease may stand still (it
    died before starting them). A pass reads what is left of their jobs'
    in-progress keys in one round trip (before: one each), and ends those 50."""
    count = 150

    async def scenario() -> None:
        redis_client = await connect(own_redis.url)
        settings = Settings.from_env({"SANDSTREAM_SANDBOX_ROOT": str(tmp_path / "sandboxes")})
        runtime = WorkerRuntime(redis_client, settings)
        store = runtime.store
        in_progress_ms = job_in_progress_ms(settings)
        long_ago = in_progress_ms - int(settings.lost_after_seconds() * 1000) - 5000
        try:
            claimed = await _queued_turns(store, settings, count)
            for n, (_, turn) in enumerate(claimed):
                if n % 3:
                    ttl = long_ago if n % 3 == 2 else in_progress_ms
                    await redis_client.set(in_progress_key_prefix + turn, b"1", px=ttl)
            sids = [sid for sid, _ in claimed]
            writes = await _counting_writes(redis_client)
            reaped = await runtime.reap_once()
            assert writes() - reaped <= 10, writes() - reaped
            assert reaped == count // 3
            for n, sid in enumerate(sids):
                state = await store.turn_state(sid)
                assert state is not None
                assert state.state == ("active" if n % 3 == 2 else "running")
        finally:
            await runtime.events.close()
            await redis_client.aclose()

    asyncio.run(scenario())


def test_a_session_running_again_is_not_dropped_from_the_running_index(
    own_redis: RedisServer,
) -> None:
    """The reaper drops a session that no longer runs a turn from the running
    index; one that a new claim made running again since the reaper read it stays
    (dropped, no reaper would watch its turn)."""

    async def scenario() -> None:
        redis_client = await connect(own_redis.url)
        store = SessionStore(redis_client)
        try:
            sandbox = await store.create_sandbox("t", {})
            sid = (await store.create_session("t", sandbox.id, {}, Settings().default_agent())).id
            turn = new_id()
            job = queued_job(TurnJob(session_id=sid, turn_id=turn))
            assert await store.claim_turn(sid, "t", turn, user_message(sid, turn, "go"), job)
            assert sid in await store.running_sessions()
            assert not await store.forget_running(sid)  # it runs a turn
            assert sid in await store.running_sessions()
            assert await store.interrupt_unstarted(sid, sandbox.id, turn)
            await redis_client.sadd(keys.RUNNING, sid)  # a stale entry
            assert await store.forget_running(sid)
            assert sid not in await store.running_sessions()
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())
