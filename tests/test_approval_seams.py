"""Approvals where they meet leases, the event writer, interrupts and races.

Real Redis, API and worker processes; one stack (an API and a worker with a
single job slot) serves the module, tests that stop Redis start their own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from conftest import RedisServer, Stack, model_env, one_slot_fixtures
from fake_llm import FakeLLM, Reply, anthropic_stream
from helpers import (
    ASK_BASH,
    StreamReader,
    decide,
    send_until_waiting,
    session_with,
    text_message,
    wait_state,
)
from redis.asyncio import Redis

from bench.harness import user_message
from shared import events as ev
from shared import keys
from shared.approvals import ApprovalStore, CallPlan, Resolution, SuspendedTurn
from shared.models import PendingApproval, ToolUseBlock, new_id, now_rfc3339
from shared.queue import TurnJob, connect, queued_job
from shared.settings import Settings
from shared.store import SessionStore
from worker.runtime import WorkerRuntime

one_slot, api = one_slot_fixtures(db=10, tool_timeout_seconds=8)


def waiting_calls(client: httpx.Client, sid: str, text: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = send_until_waiting(client, sid, text)["pending_approvals"]
    return calls


def gapless(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_a_turn_that_waits_twice_streams_every_event_gapless(
    api: httpx.Client, fake_llm: FakeLLM
) -> None:
    model = f"twice-{time.monotonic_ns()}"
    fake_llm.script(
        model,
        Reply(
            chunks=anthropic_stream(
                ("tool", "call_a", "bash", {"command": "echo a"}), stop="tool_use"
            )
        ),
        Reply(
            chunks=anthropic_stream(
                ("text", ["then "]),
                ("tool", "call_b", "bash", {"command": "echo b"}),
                stop="tool_use",
            )
        ),
        Reply(chunks=anthropic_stream(("text", ["both ", "ran"]))),
    )
    sid = session_with(api, {"provider": "anthropic", "model": model, **ASK_BASH})
    live = StreamReader(api, sid, params={"after": "0"})
    [first] = waiting_calls(api, sid, "go")
    assert decide(api, sid, first["tool_use_id"], "allow").status_code == 200
    deadline = time.monotonic() + 10
    while not (pending := api.get(f"/sessions/{sid}").json().get("pending_approvals")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [p["tool_use_id"] for p in pending] == ["call_b"]
    assert decide(api, sid, "call_b", "allow").status_code == 200
    events = live.join(15)
    gapless(events)
    final = events[-1]
    assert final["_event"] == "session_completed", final
    results = [b for b in final["message"]["content"] if b["type"] == "tool_result"]
    assert [r["content"] for r in results] == ["a\n", "b\n"]
    replay = StreamReader(api, sid, params={"after": "0"}).join(10)
    assert [e["seq"] for e in replay] == [e["seq"] for e in events]


def _decide_at_once(
    stack: Stack,
    barrier: threading.Barrier,
    answers: list[httpx.Response],
    sid: str,
    call: str,
    decision: str,
) -> None:
    with stack.client() as client:
        barrier.wait(10)
        answers.append(decide(client, sid, call, decision))


def test_two_clients_deciding_one_call_at_once_agree(api: httpx.Client, one_slot: Stack) -> None:
    for _ in range(3):
        sid = session_with(api, ASK_BASH)
        [call] = waiting_calls(api, sid, "run: echo raced")
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(
                target=_decide_at_once,
                args=(one_slot, barrier, answers, sid, call["tool_use_id"], d),
            )
            for d in ("allow", "deny")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 409], [a.text for a in answers]
        won = next(a for a in answers if a.status_code == 200).json()["decision"]
        message = wait_state(api, sid, "active")["messages"][-1]
        result = message["content"][1]
        assert result["is_error"] is (won == "deny")
        log = StreamReader(api, sid, params={"after": "0"}).join(10)
        assert len([e for e in log if e["_event"] == "tool_approval_resolved"]) == 1
        gapless(log)
        # Sent again once the turn is over: the same decision is answered alike.
        again = decide(api, sid, call["tool_use_id"], won)
        assert again.status_code == 200 and again.json()["state"] == "active", again.text
        lost = "allow" if won == "deny" else "deny"
        assert decide(api, sid, call["tool_use_id"], lost).json()["code"] == "approval_conflict"


def test_interrupting_a_queued_continuation_keeps_the_message(
    api: httpx.Client, one_slot: Stack
) -> None:
    sid = session_with(api, ASK_BASH)
    [call] = waiting_calls(api, sid, "run: echo never")
    busy = session_with(api, {})
    assert (
        api.post(
            f"/sessions/{busy}/messages", params={"wait": "0"}, json=text_message("run: sleep 2")
        ).status_code
        == 202
    )
    wait_state(api, busy, "running")
    time.sleep(0.3)
    assert decide(api, sid, call["tool_use_id"], "allow").json()["state"] == "running"
    stopped = api.post(f"/sessions/{sid}/interrupt")
    assert stopped.status_code == 200, stopped.text
    message = wait_state(api, sid, "active")["messages"][-1]
    assert message["stop_reason"] == "interrupted"
    kinds = [b["type"] for b in message["content"]]
    assert kinds[:2] == ["tool_use", "tool_result"], message
    wait_state(api, busy, "active")
    store = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    assert not store.exists(keys.suspended(sid))
    log = StreamReader(api, sid, params={"after": "0"}).join(10)
    gapless(log)
    assert (
        log[-1]["message_id"]
        == next(e for e in log if e["_event"] == "tool_use_start")["message_id"]
    )


def test_delete_while_waiting_leaves_nothing(api: httpx.Client, one_slot: Stack) -> None:
    sid = session_with(api, ASK_BASH)
    [call] = waiting_calls(api, sid, "run: echo gone")
    assert api.delete(f"/sessions/{sid}").status_code == 204
    store = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    assert store.keys(f"ss:{{{sid}}}:*") == []
    assert store.zscore(keys.APPROVAL_DEADLINES, sid) is None
    assert decide(api, sid, call["tool_use_id"], "allow").status_code == 404


def test_replayed_send_after_resume_waits_for_the_end(api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    message, key = text_message("run: sleep 1; echo slow"), {"Idempotency-Key": f"k-{sid}"}
    first = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert first.status_code == 202
    call = first.json()["pending_approvals"][0]["tool_use_id"]
    assert decide(api, sid, call, "allow").status_code == 200
    replay = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert replay.status_code == 200, replay.text
    assert replay.json()["content"][1]["content"] == "slow\n"


# ---- a store that stalls ------------------------------------------------------------

RIDE_OUT = {
    "SANDSTREAM_LEASE_SECONDS": "1",
    "SANDSTREAM_LEASE_GRACE_SECONDS": "3",
    "SANDSTREAM_REAPER_INTERVAL_SECONDS": "0.2",
    "SANDSTREAM_REDIS_SOCKET_TIMEOUT_SECONDS": "0.3",
}


def _logged(store: redis.Redis, sid: str, event_type: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(f[b"t"] == event_type.encode() for _, f in store.xrange(keys.log(sid))):
        assert time.monotonic() < deadline, f"no {event_type} event"
        time.sleep(0.02)


def test_a_redis_stall_as_the_turn_begins_to_wait_ends_no_turn(
    own_redis: RedisServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    model = f"stall-{time.monotonic_ns()}"
    call = ("tool", "call_stall", "bash", {"command": "echo after-the-stall"})
    fake_llm.script(
        model,
        # The response ends (and the turn begins to wait) while Redis is stopped.
        Reply(chunks=anthropic_stream(call, stop="tool_use"), body_stall=0.8),
        Reply(chunks=anthropic_stream(("text", ["done"]))),
    )
    env = {
        **RIDE_OUT,
        **model_env(fake_llm),
        # The worker makes the turn's provider at start-up, before it takes the
        # turn: made during the turn, the SDK's import (seconds of CPU on a
        # loaded machine, much of it native code holding the GIL) can keep the
        # event loop from renewing the 1 s lease until the stall begins, and the
        # turn is then fenced for a silence that was not the store's.
        "SANDSTREAM_PROVIDER": "anthropic",
        "SANDSTREAM_MODEL": model,
    }
    stack = Stack(own_redis.url, tmp_path / "stack", env)
    try:
        store = own_redis.client()
        with stack.client() as client:
            sid = session_with(client, {"provider": "anthropic", "model": model, **ASK_BASH})
            sent = client.post(
                f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("go")
            )
            assert sent.status_code == 202, sent.text
            _logged(store, sid, "tool_use_complete")
            assert own_redis.proc is not None
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)
            finally:
                os.kill(own_redis.proc.pid, signal.SIGCONT)
            session = wait_state(client, sid, "awaiting_approval")
            assert [p["tool_use_id"] for p in session["pending_approvals"]] == ["call_stall"]
            assert decide(client, sid, "call_stall", "allow").status_code == 200
            message = wait_state(client, sid, "active")["messages"][-1]
            assert message["stop_reason"] == "end_turn", message
            assert message["content"][1]["content"] == "after-the-stall\n"
            gapless(StreamReader(client, sid, params={"after": "0"}).join(10))
    finally:
        stack.stop()


def test_calls_the_model_names_like_the_records_fields_change_nothing(
    api: httpx.Client, fake_llm: FakeLLM
) -> None:
    model = f"field-names-{time.monotonic_ns()}"
    calls = (
        ("tool", "message_id", "bash", {"command": "echo m"}),
        ("tool", "turn_id", "bash", {"command": "echo t"}),
    )
    fake_llm.script(
        model,
        Reply(chunks=anthropic_stream(*calls, stop="tool_use")),
        Reply(chunks=anthropic_stream(("text", ["done"]))),
    )
    sid = session_with(api, {"provider": "anthropic", "model": model, **ASK_BASH})
    reply = api.post(f"/sessions/{sid}/messages", json=text_message("go"))
    assert reply.status_code == 202, reply.text
    turn_id = reply.json()["turn_id"]
    assert [p["tool_use_id"] for p in reply.json()["pending_approvals"]] == [
        "message_id",
        "turn_id",
    ]
    for call in ("message_id", "turn_id"):
        decided = decide(api, sid, call, "allow")
        assert decided.status_code == 200 and decided.json()["turn_id"] == turn_id
    message = wait_state(api, sid, "active")["messages"][-1]
    assert [b["content"] for b in message["content"] if b["type"] == "tool_result"] == [
        "m\n",
        "t\n",
    ]
    log = StreamReader(api, sid, params={"after": "0"}).join(10)
    assert {e["message_id"] for e in log if e["turn_id"] == turn_id} == {message["id"]}


# ---- the reaper and a turn that waited ----------------------------------------------


def test_a_continuation_lease_is_measured_from_its_own_start(redis_url: str) -> None:
    """The reaper saw the turn's lease at epoch 1 before it waited; its
    continuation starts at epoch 1 again. What the reaper saw before must not
    count against the continuation, whose worker fences only a lease + grace
    after its own start."""
    url = redis_url.rsplit("/", 1)[0] + "/11"

    async def scenario() -> None:
        redis_client = await connect(url)
        await redis_client.flushdb()
        settings = Settings.from_env(
            {
                "SANDSTREAM_LEASE_SECONDS": "0.6",
                "SANDSTREAM_LEASE_GRACE_SECONDS": "0.3",
                "SANDSTREAM_REAPER_INTERVAL_SECONDS": "1",
                "SANDSTREAM_SANDBOX_ROOT": tempfile.mkdtemp(prefix="sandstream-reaper-"),
            }
        )
        runtime = WorkerRuntime(redis_client, settings)
        store, approvals = runtime.store, runtime.approvals
        try:
            sandbox = await store.create_sandbox("t", {})
            sid = (await store.create_session("t", sandbox.id, {}, settings.default_agent())).id
            turn = new_id()
            user = user_message(sid, turn, "go")
            job = queued_job(TurnJob(session_id=sid, turn_id=turn))
            assert (await store.claim_turn(sid, "t", turn, user, job)).status == "ok"
            assert await store.start_turn(sid, turn, "w1")
            assert await runtime.reap_once() == 0
            assert sid in runtime._seen  # it saw the lease at epoch 1
            await asyncio.sleep(0.9)  # the model answers; the call waits; a person decides
            pending = await _suspend_for_bash(approvals, sid, turn)
            waiting = await approvals.waiting(sid)
            assert waiting is not None
            allow = Resolution(decision="allow", reason="", decided_by="k", decided_at="")
            outcome, _ = await approvals.resolve(
                sid=sid, tenant="t", waiting=waiting, mode="decide", decisions=[(pending, allow)]
            )
            assert outcome == "resumed"
            assert await store.start_turn(sid, turn, "w2")  # the continuation, epoch 1
            for _ in range(3):  # 0.9 s after its start: within its own lease + grace
                assert await runtime.reap_once() == 0
                await asyncio.sleep(0.3)
            state = await store.turn_state(sid)
            assert state is not None and state.state == "running"
        finally:
            await runtime.events.close()
            await redis_client.aclose()

    asyncio.run(scenario())


def test_an_interrupt_the_worker_missed_is_not_outlived_by_a_wait(
    api: httpx.Client, one_slot: Stack, fake_llm: FakeLLM
) -> None:
    """The interrupt's flag is set while the model answers, but its message
    never reached the worker (a dropped subscription): the turn must not then
    begin to wait for a person, to be stopped only after a decision ran its tool."""
    model = f"missed-{time.monotonic_ns()}"
    call = ("tool", "call_late", "bash", {"command": "echo ran"})
    fake_llm.script(model, Reply(chunks=anthropic_stream(call, stop="tool_use"), head_stall=1.0))
    sid = session_with(api, {"provider": "anthropic", "model": model, **ASK_BASH})
    sent = api.post(f"/sessions/{sid}/messages", params={"wait": "0"}, json=text_message("go"))
    turn_id = sent.json()["turn_id"]
    store = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    deadline = time.monotonic() + 10
    while not store.hget(keys.session(sid), "started"):
        assert time.monotonic() < deadline, "the turn did not start"
        time.sleep(0.02)
    # What the interrupt endpoint writes before it publishes (FLAG_INTERRUPT).
    store.hset(keys.session(sid), "interrupt", turn_id)
    message = wait_state(api, sid, "active")["messages"][-1]
    assert message["stop_reason"] == "interrupted"
    assert message["content"][0]["id"] == "call_late"
    assert message["content"][1]["is_error"] is True
    log = StreamReader(api, sid, params={"after": "0"}).join(10)
    gapless(log)
    kinds = [e["_event"] for e in log]
    assert "tool_approval_requested" not in kinds
    assert kinds[-2:] == ["tool_result", "session_completed"], kinds


# ---- the decision and expiry scripts, attacked directly ---------------------------


async def _a_waiting_turn(
    url: str,
) -> tuple[Redis, ApprovalStore, str, PendingApproval]:
    """A session (tenant "t") on a fresh database whose turn waits for one bash
    call, due in a minute; no worker runs."""
    redis_client = await connect(url)
    await redis_client.flushdb()
    settings = Settings.from_env({})
    store = SessionStore(redis_client)
    approvals = ApprovalStore(redis_client, log_max_events=100, log_ttl_seconds=60)
    sandbox = await store.create_sandbox("t", {})
    sid = (await store.create_session("t", sandbox.id, {}, settings.default_agent())).id
    turn = new_id()
    user = user_message(sid, turn, "go")
    assert (await store.claim_turn(sid, "t", turn, user)).status == "ok"
    assert await store.start_turn(sid, turn, "w1")
    pending = await _suspend_for_bash(approvals, sid, turn)
    return redis_client, approvals, sid, pending


async def _suspend_for_bash(approvals: ApprovalStore, sid: str, turn: str) -> PendingApproval:
    """Suspend the turn (its worker "w1") for one bash call, due in a minute."""
    call = ToolUseBlock(id="call_1", name="bash", input={"command": "true"})
    pending = PendingApproval(
        tool_use_id="call_1", name="bash", input={}, index=0, expires_at=now_rfc3339()
    )
    record = SuspendedTurn(
        turn_id=turn,
        message_id=new_id(),
        iteration=0,
        blocks=[call],
        usage=ev.Usage(),
        calls=[CallPlan(index=0, verdict="ask")],
    )
    assert await approvals.suspend(
        sid=sid,
        worker_id="w1",
        record=record,
        pending=[pending],
        events=[],
        deadline=time.time() + 60,
    )
    return pending


def test_a_stale_overdue_listing_does_not_deny_a_wait_not_yet_due(redis_url: str) -> None:
    """The reaper lists overdue waits, then reads and denies each; meanwhile a
    person may decide and the turn wait again, due later. A listing made as if
    two minutes late stands for that: the script reads the deadline itself and
    denies nothing."""
    url = redis_url.rsplit("/", 1)[0] + "/11"

    async def scenario() -> None:
        redis_client, approvals, sid, _ = await _a_waiting_turn(url)
        try:
            assert await approvals.expire_overdue(now=time.time() + 120) == 0
            waiting = await approvals.waiting(sid)
            assert waiting is not None
            assert [p.tool_use_id for p in waiting.pending] == ["call_1"]
            assert waiting.decided == {}
            # Once really due, the same pass denies it and the turn goes on.
            await redis_client.zadd(keys.APPROVAL_DEADLINES, {sid: 0})
            assert await approvals.expire_overdue() == 1
            assert await approvals.waiting(sid) is None
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())


def test_another_tenants_decision_is_refused_by_the_script(redis_url: str) -> None:
    """The API checks the session's tenant before deciding; the script checks
    it again, so a decision that reached it for another tenant records nothing."""
    url = redis_url.rsplit("/", 1)[0] + "/11"

    async def scenario() -> None:
        redis_client, approvals, sid, pending = await _a_waiting_turn(url)
        try:
            waiting = await approvals.waiting(sid)
            assert waiting is not None
            allow = Resolution(decision="allow", reason="", decided_by="k", decided_at="")
            outcome, before = await approvals.resolve(
                sid=sid, tenant="u", waiting=waiting, mode="decide", decisions=[(pending, allow)]
            )
            assert (outcome, before) == ("missing", None)
            after = await approvals.waiting(sid)
            assert after is not None and after.decided == {}
            assert [p.tool_use_id for p in after.pending] == ["call_1"]
            outcome, _ = await approvals.resolve(
                sid=sid, tenant="t", waiting=waiting, mode="decide", decisions=[(pending, allow)]
            )
            assert outcome == "resumed"
        finally:
            await redis_client.aclose()

    asyncio.run(scenario())
