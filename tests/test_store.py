"""The turn scripts against a real Redis: atomic claims, gap-free seqs, stale writers refused."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import uvloop
from conftest import RedisServer
from helpers import command_calls, failed_event
from redis.asyncio import Redis
from redis.exceptions import (
    BusyLoadingError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bench.harness import assistant_message, user_message
from shared import eventlog, keys, metrics
from shared import events as ev
from shared.approvals import ApprovalStore, SuspendedTurn
from shared.models import Message, PendingApproval, Sandbox, new_id, now_rfc3339
from shared.queue import TurnJob, queued_job
from shared.settings import Settings
from shared.store import SessionStore
from shared.turns import (
    WATCHED_MIN_EVENTS,
    FinishMode,
    TurnAppend,
    TurnIds,
    completed,
    store_unavailable,
    worth_retrying,
)
from worker.event_writer import STREAMING_WITHIN, EventWriter, TurnEvents, TurnSuperseded

T = TypeVar("T")
DEFAULT_AGENT = Settings().default_agent()


async def _claimed(store: SessionStore) -> tuple[Sandbox, str, str]:
    """A new sandbox and session, with a turn claimed (no worker runs it)."""
    sandbox = await store.create_sandbox("t", {})
    sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
    turn = new_id()
    await store.claim_turn(sid, "t", turn, _user(sid, turn))
    return sandbox, sid, turn


def run(redis_url: str, scenario: Callable[[SessionStore], Awaitable[T]]) -> T:
    async def main() -> T:
        redis = Redis.from_url(redis_url)
        try:
            return await scenario(SessionStore(redis))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def _user(sid: str, turn_id: str) -> Message:
    return user_message(sid, turn_id, "hi")


def _delta(sid: str, sandbox_id: str, turn_id: str, text: str, index: int = 0) -> ev.TextDelta:
    ids = TurnIds(session_id=sid, sandbox_id=sandbox_id, turn_id=turn_id, message_id="m")
    return ev.TextDelta(**ids.stamped(), index=index, text=text)


def test_only_one_of_many_concurrent_claims_wins(redis_url: str) -> None:
    async def scenario(store: SessionStore) -> list[str]:
        sandbox = await store.create_sandbox("t", {})
        session = await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)
        turns = [new_id() for _ in range(20)]
        results = await asyncio.gather(
            *(store.claim_turn(session.id, "t", t, _user(session.id, t)) for t in turns)
        )
        winners = [r for r in results if r.status == "ok"]
        assert len(winners) == 1
        assert {r.turn_id for r in results if r.status == "running"} == {winners[0].turn_id}
        return [m.turn_id or "" for m in await store.get_messages(session.id)]

    assert len(run(redis_url, scenario)) == 1


def test_concurrent_appends_get_consecutive_seqs(redis_url: str) -> None:
    async def scenario(store: SessionStore) -> list[int]:
        sandbox = await store.create_sandbox("t", {})
        session = await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)
        turn = new_id()
        await store.claim_turn(session.id, "t", turn, _user(session.id, turn))
        batches = [
            [_delta(session.id, sandbox.id, turn, f"{b}.{i}") for i in range(20)] for b in range(10)
        ]
        results = await asyncio.gather(
            *(store.append_events(session.id, turn, batch) for batch in batches)
        )
        seqs = [seq for batch in results for seq in batch]
        for batch in results:  # each batch is consecutive, in the order given
            assert batch == list(range(batch[0], batch[0] + len(batch)))
        logged = await eventlog.read_after(store.redis, session.id, 0)
        assert [e.seq for e in logged] == sorted(seqs)
        assert all(ev.decode_head(e.data).seq == e.seq for e in logged)
        return sorted(seqs)

    assert run(redis_url, scenario) == list(range(1, 201))


def test_a_stale_turn_can_neither_append_nor_finish(redis_url: str) -> None:
    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
        old, new = new_id(), new_id()
        await store.claim_turn(sid, "t", old, _user(sid, old))
        assert await store.finish_turn(
            sid, old, "unstarted", None, failed_event(sid, sandbox.id, old)
        )
        await store.claim_turn(sid, "t", new, _user(sid, new))
        assert await store.append_events(sid, old, [_delta(sid, sandbox.id, old, "x")]) == [0]
        assert (
            await store.finish_turn(sid, old, "worker", None, failed_event(sid, sandbox.id, old))
            == 0
        )
        state = await store.turn_state(sid)
        assert state is not None and state.turn_id == new and state.state == "running"

    run(redis_url, scenario)


def test_started_turn_is_orphaned_only_at_the_lease_epoch_seen_standing_still(
    redis_url: str,
) -> None:
    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        assert await store.start_turn(sid, turn, "w1")
        assert not await store.start_turn(sid, turn, "w2")  # no second worker
        done = failed_event(sid, sandbox.id, turn)
        assert await store.finish_turn(sid, turn, "unstarted", None, done) == 0
        state = await store.turn_state(sid)
        assert state is not None and state.lease_epoch == 1
        assert await store.renew_lease(sid, turn, "w2") == 0  # not w2's lease
        assert await store.renew_lease(sid, turn, "w1") == 1
        # A reaper that saw epoch 1 stand still is too late: the lease moved.
        assert await store.finish_turn(sid, turn, "orphaned", None, done, epoch=1) == 0
        assert await store.finish_turn(sid, turn, "orphaned", None, done, epoch=2) > 0
        assert await store.renew_lease(sid, turn, "w1") == 0
        state = await store.turn_state(sid)
        assert state is not None and state.state == "active"

    run(redis_url, scenario)


def test_a_batch_sent_again_after_a_lost_reply_is_appended_once(redis_url: str) -> None:
    async def scenario(store: SessionStore) -> list[int]:
        sandbox, sid, turn = await _claimed(store)
        first = [_delta(sid, sandbox.id, turn, "a"), _delta(sid, sandbox.id, turn, "b")]
        assert await store.append_events(sid, turn, first, 0) == [1, 2]
        assert await store.append_events(sid, turn, first, 0) == [1, 2]  # the same batch again
        assert await store.append_events(sid, turn, first[:1], 2) == [3]
        return [e.seq for e in await eventlog.read_after(store.redis, sid, 0)]

    assert run(redis_url, scenario) == [1, 2, 3]


@pytest.mark.parametrize("known", [2, WATCHED_MIN_EVENTS])
def test_events_sent_with_their_seqs_go_in_as_the_script_would_number_them(
    redis_url: str, known: int
) -> None:
    """After a turn's first append the worker knows its seqs and sends each event
    whole, with its entry id (by the script for a few, by a transaction of plain
    commands for WATCHED_MIN_EVENTS or more): the log, the live line, the
    session's seq and the mark come out as when the script numbers them, and an
    append that does not know them goes on from there."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        pubsub = store.redis.pubsub()
        await pubsub.subscribe(keys.LIVE_CHANNEL)
        await pubsub.get_message(timeout=5)
        total = known + 3
        deltas = [_delta(sid, sandbox.id, turn, f"t{i}") for i in range(total)]
        assert await store.append_events(sid, turn, deltas[:2], 0) == [1, 2]
        end = 2 + known
        seqs = list(range(3, end + 1))
        assert await store.append_events(sid, turn, deltas[2:end], 2, last_seq=2) == seqs
        assert await store.redis.get(keys.appended(sid)) == f"{turn} {end} {end}".encode()
        assert await store.redis.get(keys.seq(sid)) == str(end).encode()
        assert await store.append_events(sid, turn, deltas[end:], end) == [end + 1]
        logged = await eventlog.read_after(store.redis, sid, 0)
        assert [e.seq for e in logged] == list(range(1, total + 1))
        entries = await store.redis.xrange(keys.log(sid))
        assert [i for i, _ in entries] == [f"{n}-0".encode() for n in range(1, total + 1)]
        for (_, fields), delta, seq in zip(entries, deltas, range(1, total + 1), strict=True):
            assert fields[b"t"] == b"text_delta"
            assert fields[b"d"] == b'{"seq":%d,%b' % (seq, ev.encode_event(delta)[1:])
        lines = []
        while len(lines) < total:
            message = await pubsub.get_message(timeout=5)
            assert message is not None
            if message["type"] == "message":
                lines += message["data"].split(b"\n")
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert lines == [fields[b"d"] for _, fields in entries]

    run(redis_url, scenario)


def test_events_with_their_seqs_sent_again_after_a_lost_reply_go_in_once(
    redis_url: str,
) -> None:
    async def scenario(store: SessionStore) -> list[int]:
        sandbox, sid, turn = await _claimed(store)
        deltas = [_delta(sid, sandbox.id, turn, t) for t in "abcd"]
        assert await store.append_events(sid, turn, deltas[:2], 0) == [1, 2]
        assert await store.append_events(sid, turn, deltas[2:], 2, last_seq=2) == [3, 4]
        # the same call again: its reply was lost
        assert await store.append_events(sid, turn, deltas[2:], 2, last_seq=2) == [3, 4]
        return [e.seq for e in await eventlog.read_after(store.redis, sid, 0)]

    assert run(redis_url, scenario) == [1, 2, 3, 4]


Send = Callable[[Any, bool], Awaitable[None]]


def _sends_through(store: SessionStore, wrap: Callable[[Send], Send]) -> Callable[[], None]:
    """Each connection the store's pool hands out sends through `wrap(its send)`;
    the function returned puts the pool back."""
    pool = store.redis.connection_pool
    get_connection = pool.get_connection

    async def wrapped() -> Any:
        connection = await get_connection()
        connection.send_packed_command = wrap(connection.send_packed_command)  # type: ignore[method-assign]
        return connection

    pool.get_connection = wrapped  # type: ignore[assignment, method-assign]
    return lambda: setattr(pool, "get_connection", get_connection)


def _between_check_and_write(store: SessionStore, step: Callable[[], Awaitable[None]]) -> list[int]:
    """Run `step` when the watched append has read the marks and is about to send
    its transaction (the second send on its connection); the list counts the
    times it ran."""
    ran: list[int] = []

    def wrap(send: Send) -> Send:
        sends = 0

        async def send_packed_command(command: Any, check_health: bool = True) -> None:
            nonlocal sends
            sends += 1
            if sends == 2 and not ran:
                ran.append(1)
                await step()
            await send(command, check_health)

        return send_packed_command

    _sends_through(store, wrap)
    return ran


@pytest.mark.parametrize("end", ["orphaned", "deleted", "suspended"])
def test_a_turn_taken_away_between_the_check_and_the_write_appends_nothing(
    redis_url: str, end: str
) -> None:
    """Events with their seqs go in by a transaction on the marks it read
    (WATCH): a turn that stops being current after the read and before the
    write (reaped, deleted, suspended for approval, each removing its mark)
    appends nothing, and the call's other turn still goes in, once."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        _, other_sid, other_turn = await _claimed(store)
        for s, t in ((sid, turn), (other_sid, other_turn)):
            assert await store.start_turn(s, t, "w1")
            assert await store.append_events(s, t, [_delta(s, sandbox.id, t, "a")], 0) == [1]
        others = Redis.from_url(redis_url)
        try:

            async def take_away() -> None:
                away = SessionStore(others)
                if end == "deleted":
                    assert await away.delete_session(sid)
                elif end == "orphaned":
                    state = await away.turn_state(sid)
                    assert state is not None
                    done = failed_event(sid, sandbox.id, turn)
                    assert await away.finish_turn(
                        sid, turn, "orphaned", None, done, epoch=state.lease_epoch
                    )
                else:
                    call = PendingApproval(
                        tool_use_id="toolu_1",
                        name="bash",
                        input={},
                        index=0,
                        expires_at=now_rfc3339(),
                    )
                    record = SuspendedTurn(
                        turn_id=turn,
                        message_id="m",
                        iteration=0,
                        blocks=[],
                        usage=ev.Usage(),
                        calls=[],
                    )
                    approvals = ApprovalStore(others, log_max_events=100, log_ttl_seconds=60)
                    assert await approvals.suspend(
                        sid=sid,
                        worker_id="w1",
                        record=record,
                        pending=[call],
                        events=[],
                        deadline=1e10,
                    )

            ran = _between_check_and_write(store, take_away)
            half = WATCHED_MIN_EVENTS // 2  # the two turns' events make a transaction
            batch = [
                TurnAppend(s, t, [_delta(s, sandbox.id, t, "b")] * half, False, 1, last_seq=1)
                for s, t in ((sid, turn), (other_sid, other_turn))
            ]
            # A suspended turn is still the session's, its log past what the
            # worker counts: refused as out of order, as the script refuses it.
            refused = -1 if end == "suspended" else 0
            assert await store.append_batch(batch) == [refused, 2]
            assert ran == [1]
        finally:
            await others.aclose()
        other = await eventlog.read_after(store.redis, other_sid, 0)
        assert [e.seq for e in other] == list(range(1, half + 2))
        logged = await eventlog.read_after(store.redis, sid, 0)
        if end == "deleted":
            assert logged == []
        else:  # its one delta, then what took the turn away, and nothing of this call
            assert [e.seq for e in logged] == list(range(1, len(logged) + 1))
            assert b'"text":"b"' not in b"".join(e.data for e in logged)

    run(redis_url, scenario)


def test_a_call_of_many_events_with_their_seqs_goes_in_without_a_script(
    tmp_path: Path,
) -> None:
    """A call whose turns' events with seqs number WATCHED_MIN_EVENTS or more runs
    no script: a transaction of plain commands (the script's way cost Redis
    more CPU an event for such calls, bench 6b); a smaller one is one EVALSHA
    (cheaper there, and fewer commands). A turn's first append in a large call
    goes by the script inside that transaction, and when the scripts are gone
    (a restarted Redis) it is sent again on its own; each event goes in once."""
    server = RedisServer(tmp_path)
    try:

        async def scenario(store: SessionStore) -> None:
            sandbox, sid, turn = await _claimed(store)
            _, new_sid, new_turn = await _claimed(store)
            store.watched_min_events = 0  # a call with no seqs to give still goes
            assert await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "a")], 0)
            store.watched_min_events = WATCHED_MIN_EVENTS

            async def calls(batch: list[TurnAppend]) -> tuple[list[int], int, int]:
                firsts, counted = await _command_calls(store.redis, store.append_batch(batch))
                return firsts, counted.get("evalsha", 0), counted.get("exec", 0)

            few = [_delta(sid, sandbox.id, turn, "b")] * (WATCHED_MIN_EVENTS - 1)
            assert await calls([TurnAppend(sid, turn, few, False, 1, 1)]) == ([2], 1, 0)
            last = WATCHED_MIN_EVENTS
            many = [_delta(sid, sandbox.id, turn, "c")] * WATCHED_MIN_EVENTS
            known = TurnAppend(sid, turn, many, False, last, last)
            assert await calls([known]) == ([last + 1], 0, 1)
            last += WATCHED_MIN_EVENTS
            await store.redis.script_flush()
            first = TurnAppend(
                new_sid, new_turn, [_delta(new_sid, sandbox.id, new_turn, "x")], True, 0
            )
            known = TurnAppend(sid, turn, many, False, last, last)
            assert await store.append_batch([first, known]) == [1, last + 1]
            logged = await eventlog.read_after(store.redis, sid, 0)
            assert [e.seq for e in logged] == list(range(1, last + WATCHED_MIN_EVENTS + 1))
            assert [e.seq for e in await eventlog.read_after(store.redis, new_sid, 0)] == [1]
            assert await store.redis.get(keys.appended(new_sid)) == f"{new_turn} 1 1".encode()

        run(server.url, scenario)
    finally:
        server.stop()


@pytest.mark.parametrize("when", ["queued", "at_exec"])
def test_events_with_their_seqs_refused_for_want_of_memory_go_in_once_memory_is_back(
    tmp_path: Path, when: str
) -> None:
    """A store out of memory refuses the transaction: as its writes are queued,
    or at EXEC when memory ran out after they were queued (EXECABORT). Either
    way the call fails as the store being full, which a turn waits out (at EXEC
    it failed every turn of the call, before a helper's attack), nothing of it
    is written, and the same call sent again later goes in once."""
    server = RedisServer(tmp_path)
    try:

        async def scenario(store: SessionStore) -> None:
            sandbox, sid, turn = await _claimed(store)
            assert await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "a")], 0)
            many = [_delta(sid, sandbox.id, turn, "b")] * WATCHED_MIN_EVENTS
            known = TurnAppend(sid, turn, many, False, 1, 1)
            others = Redis.from_url(server.url)
            held: list[int] = []

            def exec_held_back(send: Send) -> Send:
                async def send_packed_command(command: Any, check_health: bool = True) -> None:
                    data = b"".join(command) if isinstance(command, list) else command
                    at = data.rfind(b"*1\r\n$4\r\nEXEC\r\n")
                    if at <= 0 or held:
                        return await send(command, check_health)
                    held.append(1)
                    await send([data[:at]], check_health)
                    for _ in range(400):  # until Redis has queued them (CLIENT LIST)
                        if any(int(c["multi"]) > 0 for c in await others.client_list()):
                            break
                        await asyncio.sleep(0.005)
                    await others.config_set("maxmemory", 1)
                    await send([data[at:]], check_health)

                return send_packed_command

            if when == "queued":
                await others.config_set("maxmemory", 1)
            put_back = _sends_through(store, exec_held_back if when == "at_exec" else lambda s: s)
            try:
                with pytest.raises(ExecAbortError if when == "at_exec" else OutOfMemoryError) as e:
                    await store.append_batch([known])
                assert held == ([1] if when == "at_exec" else [])
                assert worth_retrying(e.value)
                assert await store.redis.xlen(keys.log(sid)) == 1
                assert await store.redis.get(keys.appended(sid)) == f"{turn} 1 1".encode()
                await others.config_set("maxmemory", 0)
                assert await store.append_batch([known]) == [2]
            finally:
                put_back()
                await others.aclose()
            logged = await eventlog.read_after(store.redis, sid, 0)
            assert [e.seq for e in logged] == list(range(1, WATCHED_MIN_EVENTS + 2))

        run(server.url, scenario)
    finally:
        server.stop()


@pytest.mark.parametrize(("before", "last"), [(1, 2), (3, 2), (2, 1), (2, 3)])
def test_events_with_seqs_the_log_does_not_match_are_refused_whole(
    redis_url: str, before: int, last: int
) -> None:
    """A worker whose count or seq is not the log's appends nothing: its events
    would take seqs that are not theirs."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        deltas = [_delta(sid, sandbox.id, turn, t) for t in "abc"]
        assert await store.append_events(sid, turn, deltas[:2], 0) == [1, 2]
        with pytest.raises(RuntimeError, match="out of order"):
            await store.append_events(sid, turn, deltas[2:], before, last_seq=last)
        assert [e.seq for e in await eventlog.read_after(store.redis, sid, 0)] == [1, 2]
        assert await store.redis.get(keys.appended(sid)) == f"{turn} 2 2".encode()
        assert await store.redis.get(keys.seq(sid)) == b"2"

    run(redis_url, scenario)


def test_an_append_that_does_not_count_leaves_no_mark_for_seqs_given_past_it(
    redis_url: str,
) -> None:
    """An append without a count moves the log past the mark's seq: a later
    append with the seqs the mark implied is refused whole, and the other turns
    of its call are appended (the script does not stop halfway on an id taken)."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        other_sandbox, other_sid, other_turn = await _claimed(store)
        assert await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "a")], 0)
        mine = _delta(other_sid, other_sandbox.id, other_turn, "a")
        assert await store.append_events(other_sid, other_turn, [mine], 0) == [1]
        assert await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "b")]) == [2]
        firsts = await store.append_batch(
            [
                TurnAppend(other_sid, other_turn, [mine], False, 1, last_seq=1),
                TurnAppend(sid, turn, [_delta(sid, sandbox.id, turn, "c")], False, 1, 1),
            ]
        )
        assert firsts == [2, -1]
        assert [e.seq for e in await eventlog.read_after(store.redis, sid, 0)] == [1, 2]
        assert [e.seq for e in await eventlog.read_after(store.redis, other_sid, 0)] == [1, 2]
        assert await store.redis.get(keys.appended(other_sid)) == f"{other_turn} 2 2".encode()

    run(redis_url, scenario)


def test_the_writer_sends_a_turns_seqs_once_the_log_has_given_them(redis_url: str) -> None:
    """The writer's first call of a turn leaves the seqs to the script; its later
    calls send each event with the seq the log will give it."""

    async def scenario(store: SessionStore) -> list[int | None]:
        sandbox, sid, turn = await _claimed(store)
        sent: list[int | None] = []
        append_batch = store.append_batch

        async def recorded(turns: list[TurnAppend]) -> list[int]:
            sent.extend(t.last_seq for t in turns)
            return await append_batch(turns)

        store.append_batch = recorded  # type: ignore[method-assign]
        events = EventWriter(store)
        part = events.open(sid, turn, lambda: None)
        try:
            for n, text in enumerate(["a", "b", "c"]):
                part.put(_delta(sid, sandbox.id, turn, text, index=n))
                part.put(_delta(sid, sandbox.id, turn, text, index=n + 10))
                await events.flushed()
        finally:
            part.close()
            await events.close()
        logged = await eventlog.read_after(store.redis, sid, 0)
        assert [e.seq for e in logged] == [1, 2, 3, 4, 5, 6]
        assert [ev.decode_head(e.data).seq for e in logged] == [1, 2, 3, 4, 5, 6]
        return sent

    assert run(redis_url, scenario) == [None, 2, 4]


def test_one_call_publishes_once_for_all_its_sessions_each_event_once(
    own_redis: RedisServer,
) -> None:
    """Sessions share the live channel: the turns of one call, whatever their
    sessions, cost one PUBLISH, not one per session or per channel, and a
    subscriber gets every event once, in seq order per session, each naming its
    session."""

    async def scenario(store: SessionStore) -> None:
        claimed = [await _claimed(store) for _ in range(24)]
        pubsub = store.redis.pubsub()
        await pubsub.subscribe(keys.LIVE_CHANNEL)
        await pubsub.get_message(timeout=5)  # the confirmation
        batch = [
            TurnAppend(
                sid,
                turn,
                [_delta(sid, sandbox.id, turn, f"{sid}-{n}") for n in range(2)],
                True,
                appended_before=0,
            )
            for sandbox, sid, turn in claimed
        ]
        before = await store.redis.info("commandstats")
        await store.append_batch(batch)
        after = await store.redis.info("commandstats")
        published = after["cmdstat_publish"]["calls"] - before.get("cmdstat_publish", {}).get(
            "calls", 0
        )
        assert published == 1
        seen: dict[str, list[tuple[int, str]]] = {}
        message = await pubsub.get_message(timeout=5)
        assert message is not None and message["type"] == "message"
        assert keys.LIVE_CHANNEL.encode() == message["channel"]
        for line in message["data"].split(b"\n"):
            event = msgspec.json.decode(line)
            seen.setdefault(event["session_id"], []).append((event["seq"], event["text"]))
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        assert seen == {sid: [(1, f"{sid}-0"), (2, f"{sid}-1")] for _, sid, _ in claimed}

    run(own_redis.url, scenario)


def test_a_turn_that_appended_is_fenced_by_its_mark_without_reading_the_session(
    own_redis: RedisServer,
) -> None:
    """Only a turn's first append reads the session's hash to check the turn is
    current; later ones find the turn named by the appended mark they read anyway
    (one command less per turn per call)."""

    async def scenario(store: SessionStore) -> int:
        sandbox, sid, turn = await _claimed(store)
        assert await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "a")], 0)
        before = await store.redis.info("commandstats")
        for n in range(1, 11):
            [seq] = await store.append_events(sid, turn, [_delta(sid, sandbox.id, turn, "b")], n)
            assert seq == n + 1
        after = await store.redis.info("commandstats")
        return int(after["cmdstat_hget"]["calls"] - before["cmdstat_hget"]["calls"])

    assert run(own_redis.url, scenario) == 0


@pytest.mark.parametrize("numbered_by", ["script", "worker"])
@pytest.mark.parametrize("end", ["orphaned", "worker", "deleted"])
def test_a_turn_that_ended_appends_nothing_more_though_its_mark_named_it(
    redis_url: str, end: str, numbered_by: str
) -> None:
    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        assert await store.start_turn(sid, turn, "w1")
        delta = _delta(sid, sandbox.id, turn, "a")
        assert await store.append_events(sid, turn, [delta], 0) == [1]
        assert await store.append_events(sid, turn, [delta], 1) == [2]
        done = failed_event(sid, sandbox.id, turn)
        if end == "deleted":
            assert await store.delete_session(sid)
        else:
            state = await store.turn_state(sid)
            assert state is not None
            mode: FinishMode = "orphaned" if end == "orphaned" else "worker"
            worker = "w1" if mode == "worker" else ""  # a worker ends only its own turn
            assert await store.finish_turn(
                sid, turn, mode, None, done, epoch=state.lease_epoch, worker_id=worker
            )
        # The turn's worker, cut off, sends its next call, or the last one again.
        known = numbered_by == "worker"
        assert await store.append_events(sid, turn, [delta], 2, 2 if known else None) == [0]
        assert await store.append_events(sid, turn, [delta], 1, 1 if known else None) == [0]
        if end == "deleted":
            assert not await store.redis.exists(keys.log(sid), keys.seq(sid))
        else:
            seqs = [e.seq for e in await eventlog.read_after(store.redis, sid, 0)]
            assert seqs == [1, 2, 3]  # its two events and the terminal one

    run(redis_url, scenario)


def test_appends_are_one_round_trip_and_survive_a_script_flush(tmp_path: Path) -> None:
    """A batch of appends is one EVALSHA, with no SCRIPT EXISTS before it; after
    the scripts are gone (a restarted Redis), it loads them and goes on."""
    server = RedisServer(tmp_path)
    try:

        async def scenario(store: SessionStore) -> list[int]:
            sandbox = await store.create_sandbox("t", {})
            session = await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)
            turn = new_id()
            await store.claim_turn(session.id, "t", turn, _user(session.id, turn))
            batch = [_delta(session.id, sandbox.id, turn, str(i)) for i in range(5)]
            await store.redis.script_flush()
            seqs = await store.append_events(session.id, turn, batch)
            before = await store.redis.info("commandstats")
            for _ in range(10):
                seqs += await store.append_events(session.id, turn, batch)
            after = await store.redis.info("commandstats")
            script = {k: v["calls"] for k, v in after.items() if k.startswith("cmdstat_script")}
            assert script == {
                k: v["calls"] for k, v in before.items() if k.startswith("cmdstat_script")
            }
            assert after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"] == 10
            return seqs

        assert run(server.url, scenario) == list(range(1, 56))
    finally:
        server.stop()


def test_an_outcome_bucket_expires_from_its_first_count_of_each_outcome(redis_url: str) -> None:
    """The ops report's buckets of turn outcomes expire; the fold of turns'
    tallies sets the expiry only as an outcome first enters the bucket, not at
    every end (here every end folds)."""

    async def scenario(store: SessionStore) -> list[tuple[int, bool]]:
        redis = store.redis
        store.tally_fold_at = 1

        async def expires() -> int:
            stats = await redis.info("commandstats")
            return int(stats.get("cmdstat_expire", {}).get("calls", 0))

        # Three ends in one bucket: not within a few seconds of the next one.
        while time.time() % keys.STATS_BUCKET_SECONDS > keys.STATS_BUCKET_SECONDS - 5:
            await asyncio.sleep(0.5)
        bucket = keys.turn_outcomes(int(time.time()) // keys.STATS_BUCKET_SECONDS)
        await redis.delete(bucket, keys.METRICS_TALLIES)  # other tests' turns ended in it too
        seen = []
        for outcome in ("failed", "failed", "completed"):
            sandbox, sid, turn = await _claimed(store)
            ids = TurnIds(session_id=sid, sandbox_id=sandbox.id, turn_id=turn, message_id=new_id())
            reply = assistant_message(ids, "done")
            done: ev.TerminalEvent = (
                failed_event(sid, sandbox.id, turn)
                if outcome == "failed"
                else completed(ids, reply, "end_turn", ev.Usage(input_tokens=1, output_tokens=1))
            )
            before = await expires()
            assert await store.finish_turn(sid, turn, "unstarted", None, done) > 0
            ttl = await redis.ttl(bucket)
            seen.append((await expires() - before, 0 < ttl <= 2 * 3600))
        return seen

    # The first failure and the first completion set it; the second failure
    # finds its field there, and the bucket keeps the expiry it has.
    assert run(redis_url, scenario) == [(1, True), (0, True), (1, True)]


def test_a_turn_end_missing_one_of_its_texts_is_refused_before_any_write(redis_url: str) -> None:
    """FINISH_TURN takes each event's text as an argument of its own: a call whose
    texts do not match its event types is refused whole, instead of failing
    halfway with the session freed and no terminal event in the log."""

    async def scenario(store: SessionStore) -> tuple[bool, str, bool, int, int]:
        sandbox, sid, turn = await _claimed(store)
        finish = store._finish

        async def one_text_short(keys: list[str], args: list[bytes]) -> object:
            return await finish(keys=keys, args=args[:-1])

        store._finish = one_text_short  # type: ignore[assignment]
        delta = _delta(sid, sandbox.id, turn, "left over")
        done = failed_event(sid, sandbox.id, turn)
        refused = False
        try:
            await store.finish_turn(sid, turn, "unstarted", None, done, None, [delta])
        except ResponseError as exc:
            refused = "FINISH_TURN" in str(exc)
        state = await store.turn_state(sid)
        assert state is not None
        redis = store.redis
        return (
            refused,
            state.state,
            state.turn_id == turn,
            await redis.xlen(keys.log(sid)),
            await redis.llen(keys.messages(sid)),
        )

    # Still running, its turn current, no event logged, only the user's message.
    assert run(redis_url, scenario) == (True, "running", True, 0, 1)


def test_a_turn_loads_the_history_its_agent_reads(redis_url: str) -> None:
    """The demo agent answers the turn's message alone: its turns load that one
    message, however long the conversation; a model's turns load all of it."""

    async def scenario(store: SessionStore) -> dict[str, list[int]]:
        sandbox = await store.create_sandbox("t", {})
        model = msgspec.structs.replace(DEFAULT_AGENT, provider="anthropic", model="m")
        loaded: dict[str, list[int]] = {}
        for name, agent in (("demo", DEFAULT_AGENT), ("model", model)):
            session = await store.create_session("t", sandbox.id, {}, agent)
            loaded[name] = []
            for _ in range(3):
                turn = new_id()
                await store.claim_turn(session.id, "t", turn, _user(session.id, turn))
                started = await store.start_turn(session.id, turn, "w")
                assert started is not None and started.history[-1].turn_id == turn
                loaded[name].append(len(started.history))
                done = failed_event(session.id, sandbox.id, turn)
                assert await store.finish_turn(
                    session.id, turn, "worker", None, done, worker_id="w"
                )
        return loaded

    assert run(redis_url, scenario) == {"demo": [1, 1, 1], "model": [1, 2, 3]}


def test_a_stopped_writer_leaves_the_last_events_to_the_turns_end(redis_url: str) -> None:
    """Events go out as they come until the model is done; those after `stop`
    wait for `detach`, which the turn's end appends with its terminal event."""

    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        session = await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)
        turn = new_id()
        await store.claim_turn(session.id, "t", turn, _user(session.id, turn))
        assert await store.start_turn(session.id, turn, "w1")
        events = EventWriter(store)
        writer = events.open(session.id, turn, lambda: None)
        try:
            writer.put(_delta(session.id, sandbox.id, turn, "a"))
            writer.put(_delta(session.id, sandbox.id, turn, "b", index=1))
            await asyncio.sleep(0.1)
            assert len(await eventlog.read_after(store.redis, session.id, 0)) == 2
            writer.stop()
            writer.put(_delta(session.id, sandbox.id, turn, "c"))
            await asyncio.sleep(0.1)
            assert len(await eventlog.read_after(store.redis, session.id, 0)) == 2
            rest = await writer.detach()
            assert [e.text for e in rest if isinstance(e, ev.TextDelta)] == ["c"]
            done = failed_event(session.id, sandbox.id, turn)
            ended = await store.finish_turn(
                session.id, turn, "worker", None, done, None, rest, worker_id="w1"
            )
            assert ended == 4
            logged = await eventlog.read_after(store.redis, session.id, 0)
            assert [ev.decode_head(e.data).type for e in logged][-2:] == [
                "text_delta",
                "session_failed",
            ]
        finally:
            writer.close()
            await events.close()

    run(redis_url, scenario)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'"), True),
        (ReadOnlyError("READONLY You can't write against a read only replica."), True),
        (BusyLoadingError("LOADING Redis is loading the dataset in memory"), True),
        (ResponseError("BUSY Redis is busy running a script."), True),
        (RedisConnectionError("Connection refused"), True),
        (RedisTimeoutError("Timeout reading from 127.0.0.1:6379"), True),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (ConnectionRefusedError(111, "Connection refused"), True),
        (ResponseError("ERR Error running script: attempt to index a nil value"), False),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        # EXEC refused for what held as it ran (redis-py drops the EXECABORT code)
        (ExecAbortError("Transaction discarded because of: OOM command not allowed"), True),
        (ExecAbortError("Transaction discarded because of: BUSY Redis is busy"), True),
        (ExecAbortError("Transaction discarded because of: READONLY You can't write"), True),
        (ExecAbortError("Transaction discarded because of previous errors."), False),
        (ExecAbortError("Transaction discarded because of: WRONGTYPE Operation"), False),
    ],
)
def test_store_errors_that_a_turn_waits_out(error: Exception, unavailable: bool) -> None:
    assert store_unavailable(error) is unavailable
    # What a turn asks again: those, and a reply that did not come in time.
    assert worth_retrying(error) is unavailable
    assert worth_retrying(TimeoutError())


def test_the_writer_sends_all_turns_events_in_one_call_and_refuses_a_stale_turn(
    redis_url: str,
) -> None:
    """The pending events of every turn go out in one script call; a turn that is
    no longer current gets none of its events written and is told so, while the
    others in the same call are appended."""

    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        turns: list[tuple[str, str]] = []
        for _ in range(3):
            sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
            turn = new_id()
            await store.claim_turn(sid, "t", turn, _user(sid, turn))
            turns.append((sid, turn))
        stale_sid, stale_turn = turns[1]
        done = failed_event(stale_sid, sandbox.id, stale_turn)
        assert await store.finish_turn(stale_sid, stale_turn, "unstarted", None, done)
        superseded: list[str] = []
        events = EventWriter(store)
        parts = [events.open(sid, turn, lambda t=turn: superseded.append(t)) for sid, turn in turns]
        before = await store.redis.info("commandstats")
        for part, (sid, turn) in zip(parts, turns, strict=True):
            part.put(_delta(sid, sandbox.id, turn, "a"))
            part.put(_delta(sid, sandbox.id, turn, "b", index=1))
        await events.flushed()
        after = await store.redis.info("commandstats")
        await events.close()
        assert after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"] == 1
        assert superseded == [stale_turn]
        for sid, turn in turns:
            logged = await eventlog.read_after(store.redis, sid, 0)
            if turn == stale_turn:
                assert [e.type for e in logged] == ["session_failed"]
            else:
                assert [e.seq for e in logged] == [1, 2]
                assert [ev.decode_head(e.data).seq for e in logged] == [1, 2]

    run(redis_url, scenario)


def test_a_writer_asking_an_away_store_again_stops_once_its_turns_are_abandoned(
    redis_url: str,
) -> None:
    """The store refuses every append: the writer asks again for as long as one of
    the call's turns is still this worker's. Once the turn is abandoned (its lease
    lost) it stops, the turn learns it was superseded, and the writer goes on
    with the next turn's events."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        _, other_sid, other_turn = await _claimed(store)
        append_batch = store.append_batch
        refused: list[int] = []

        async def away(turns: list[TurnAppend]) -> list[int]:
            if any(t.turn_id == turn for t in turns):
                refused.append(len(turns))
                raise RedisConnectionError("Connection refused")
            return await append_batch(turns)

        store.append_batch = away  # type: ignore[method-assign]
        events = EventWriter(store)
        part = events.open(sid, turn, lambda: None)
        part.put(_delta(sid, sandbox.id, turn, "lost"))
        while len(refused) < 3:
            await asyncio.sleep(0.01)
        assert events.sending
        part.abandon()
        async with asyncio.timeout(3):  # the backoff's longest pause is 1 s
            await events.call_done()
        asked = len(refused)
        with pytest.raises(TurnSuperseded):
            await part.detach()
        other = events.open(other_sid, other_turn, lambda: None)
        other.put(_delta(other_sid, sandbox.id, other_turn, "kept"))
        async with asyncio.timeout(3):
            await events.flushed()
        await events.close()
        assert len(refused) == asked  # not asked again after the call gave up
        assert await eventlog.read_after(store.redis, sid, 0) == []
        assert [e.seq for e in await eventlog.read_after(store.redis, other_sid, 0)] == [1]

    run(redis_url, scenario)


def test_text_deltas_of_a_block_waiting_to_be_sent_are_joined(redis_url: str) -> None:
    """Deltas that pile up while a call is in flight go out as one, in order, with
    the exact text; a delta of another block is not joined to them."""

    async def scenario(store: SessionStore) -> list[tuple[int, str]]:
        sandbox, sid, turn = await _claimed(store)
        events = EventWriter(store)
        part = events.open(sid, turn, lambda: None)
        part.put(_delta(sid, sandbox.id, turn, "He"))
        while not events.sending:
            await asyncio.sleep(0)
        for text in ("llo", ", ", "world"):
            part.put(_delta(sid, sandbox.id, turn, text))
        part.put(_delta(sid, sandbox.id, turn, "!", index=1))
        await events.flushed()
        await events.close()
        logged = await eventlog.read_after(store.redis, sid, 0)
        decoded = [msgspec.json.decode(e.data, type=ev.TextDelta) for e in logged]
        return [(d.index, d.text) for d in decoded]

    assert run(redis_url, scenario) == [(0, "He"), (0, "llo, world"), (1, "!")]


def test_a_turn_that_stops_before_its_events_are_taken_sends_none_of_them(
    redis_url: str,
) -> None:
    """Events queued and then left to the turn's end (`stop`) before the writer
    took them are not sent: they come back at detach, and the call the writer
    makes next carries only the other turn's."""

    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        turns = []
        for _ in range(2):
            sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
            turn = new_id()
            await store.claim_turn(sid, "t", turn, _user(sid, turn))
            turns.append((sid, turn))
        events = EventWriter(store)
        stopping, going = (events.open(sid, turn, lambda: None) for sid, turn in turns)
        before = await store.redis.info("commandstats")
        stopping.put(_delta(turns[0][0], sandbox.id, turns[0][1], "a"))
        stopping.stop()
        going.put(_delta(turns[1][0], sandbox.id, turns[1][1], "b"))
        await events.flushed()
        rest = await stopping.detach()
        after = await store.redis.info("commandstats")
        await events.close()
        assert [e.text for e in rest if isinstance(e, ev.TextDelta)] == ["a"]
        assert after["cmdstat_evalsha"]["calls"] - before["cmdstat_evalsha"]["calls"] == 1
        assert await eventlog.read_after(store.redis, turns[0][0], 0) == []
        assert len(await eventlog.read_after(store.redis, turns[1][0], 0)) == 1

    run(redis_url, scenario)


def test_text_deltas_within_the_text_window_go_out_as_one_after_the_first(
    redis_url: str,
) -> None:
    """With a text window, a turn's first delta goes out at once; those that come
    within the window after it wait for it to pass and go out joined."""

    async def scenario(store: SessionStore) -> list[str]:
        sandbox, sid, turn = await _claimed(store)
        events = EventWriter(store, text_window=0.3)
        part = events.open(sid, turn, lambda: None)
        part.put(_delta(sid, sandbox.id, turn, "first"))
        await events.flushed()
        for text in ("se", "co", "nd"):
            part.put(_delta(sid, sandbox.id, turn, text))
        await events.flushed()
        assert len(await eventlog.read_after(store.redis, sid, 0)) == 1  # held
        while len(logged := await eventlog.read_after(store.redis, sid, 0)) < 2:
            await asyncio.sleep(0.01)
        await events.close()
        return [msgspec.json.decode(e.data, type=ev.TextDelta).text for e in logged]

    assert run(redis_url, scenario) == ["first", "second"]


def test_a_writer_whose_turns_stream_gathers_longer_but_first_events_go_at_once(
    redis_url: str,
) -> None:
    """A busy writer starts its calls further apart the more of its turns stream
    (here 0.1 s a turn, at most 1 s); a turn's first events cut that short, and
    neither a turn that has put nothing lately nor a stopped one counts."""

    async def scenario(store: SessionStore) -> tuple[list[float], list[list[str]], list[float]]:
        loop = asyncio.get_running_loop()
        calls: list[tuple[float, list[str]]] = []
        append = store.append_batch

        async def timed(batch: list[TurnAppend]) -> list[int]:
            calls.append((loop.time(), [b.events[0].text for b in batch]))  # type: ignore[union-attr]
            return await append(batch)

        store.append_batch = timed  # type: ignore[method-assign]
        writer = EventWriter(store, max_gather=1.0, gather_per_turn=0.1)
        claimed = [await _claimed(store) for _ in range(10)]
        turns = [writer.open(sid, turn, lambda: None) for _, sid, turn in claimed[:9]]
        gathers = [writer.gather()]  # nothing put yet: the floor
        for (sandbox, sid, turn), part in zip(claimed, turns, strict=False):
            part.put(_delta(sid, sandbox.id, turn, "first"))
        gathers.append(writer.gather())  # 9 streaming
        await writer.flushed()  # an idle writer sends at once
        for (sandbox, sid, turn), part in zip(claimed, turns, strict=False):
            part.put(_delta(sid, sandbox.id, turn, "second"))
        await asyncio.sleep(0.05)
        sandbox, sid, turn = claimed[9]
        tenth = writer.open(sid, turn, lambda: None)
        tenth.put(_delta(sid, sandbox.id, turn, "first"))  # waits 2 ms, not a second
        await writer.flushed()
        for (sandbox, sid, turn), part in zip(claimed, [*turns, tenth], strict=True):
            part.put(_delta(sid, sandbox.id, turn, "third"))
        await writer.flushed()  # 10 turns: a second after the call before
        await asyncio.sleep(STREAMING_WITHIN)
        gathers.append(writer.gather())  # carried, but quiet lately
        tenth.put(_delta(sid, sandbox.id, turn, "fourth"))
        gathers.append(writer.gather())  # one streaming again
        for part in [*turns, tenth]:
            part.stop()
        gathers.append(writer.gather())  # none carried
        await writer.close()
        starts = [at - calls[0][0] for at, _ in calls]
        return starts, [sorted(set(texts)) for _, texts in calls], gathers

    starts, texts, gathers = run(redis_url, scenario)
    assert texts == [["first"], ["first", "second"], ["third"]]
    assert starts[1] < 0.5  # the tenth turn's first event did not wait out 0.9 s
    assert starts[2] - starts[1] >= 1.0  # 10 turns streaming: 1 s, the most
    assert gathers == [0.002, pytest.approx(0.9), 0.002, pytest.approx(0.1), 0.002]


def test_a_turn_whose_call_was_refused_sends_nothing_more_not_even_an_empty_batch(
    own_redis: RedisServer,
) -> None:
    """A call the store refuses for good (here: Redis's ACL denies the append
    script, NOPERM) fails its turns, and the events a turn put while that call
    was in flight are dropped with them. The turn, queued again by those events,
    is not sent again with none (before: the writer sent it in a call of no
    events, and the transaction's way published an empty live message)."""

    async def scenario() -> tuple[list[int], list[str]]:
        redis = Redis.from_url(own_redis.url)
        store = SessionStore(redis)
        sandbox, sid, turn = await _claimed(store)
        sent: list[int] = []  # the events each call carried for the turn
        append_batch = store.append_batch
        held = asyncio.Event()
        go_on = asyncio.Event()

        async def watched_append(batch: list[TurnAppend]) -> list[int]:
            sent.extend(len(t.events) for t in batch)
            if len(sent) == 2:  # the call after the first: held in flight
                held.set()
                await go_on.wait()
            return await append_batch(batch)

        store.append_batch = watched_append  # type: ignore[method-assign]
        superseded: list[str] = []
        writer = EventWriter(store)
        part = writer.open(sid, turn, lambda: superseded.append(turn))
        part.put(_delta(sid, sandbox.id, turn, "a"))
        await writer.flushed()
        part.put(_delta(sid, sandbox.id, turn, "b"))
        async with asyncio.timeout(5):
            await held.wait()
        part.put(_delta(sid, sandbox.id, turn, "c"))  # queued again, behind the call
        await redis.execute_command("ACL", "SETUSER", "default", "-evalsha")
        go_on.set()
        async with asyncio.timeout(5):
            while not superseded:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the writer's next passes, had it more to send
        await writer.close()
        await redis.execute_command("ACL", "SETUSER", "default", "+evalsha")
        await redis.aclose()
        return sent, superseded

    sent, superseded = asyncio.run(scenario())
    assert superseded
    assert sent == [1, 1]


@pytest.mark.parametrize("way", ["transaction", "script"])
def test_a_gathering_writer_rides_out_a_stalled_store_and_logs_every_event_once(
    own_redis: RedisServer, way: str
) -> None:
    """Ten streaming turns on a writer that gathers (0.2 s a call) while Redis is
    stopped for a second and a half (SIGSTOP: it holds the connections and
    answers nothing): calls time out and are sent again, some of them taken
    after all once Redis runs on (their replies lost). Every event of every turn
    is in its log once, in order, with gap-free seqs, and the writer goes on;
    with the events after each turn's first append written by a transaction of
    plain commands (a call carries some 40 of them) and by the script alike."""

    async def scenario() -> tuple[dict[str, str], dict[str, str], list[bool]]:
        redis = Redis.from_url(own_redis.url, socket_timeout=0.5)
        store = SessionStore(redis)
        store.watched_min_events = 1 if way == "transaction" else 1 << 30
        execs = (await redis.info("commandstats")).get("cmdstat_exec", {"calls": 0})["calls"]
        claimed = [await _claimed(store) for _ in range(10)]
        writer = EventWriter(store, max_gather=0.2, gather_per_turn=0.02)
        turns = [writer.open(sid, turn, lambda: None) for _, sid, turn in claimed]
        put: dict[str, str] = {sid: "" for _, sid, _ in claimed}

        async def produce(sandbox_id: str, sid: str, turn: str, part: TurnEvents) -> None:
            for n in range(30):
                part.put(_delta(sid, sandbox_id, turn, f"{n},"))
                put[sid] += f"{n},"
                await asyncio.sleep(0.05)

        async def stall() -> None:
            await asyncio.sleep(0.4)
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)
            finally:
                own_redis.proc.send_signal(signal.SIGCONT)

        await asyncio.gather(
            stall(),
            *(
                produce(sandbox.id, sid, turn, part)
                for (sandbox, sid, turn), part in zip(claimed, turns, strict=True)
            ),
        )
        async with asyncio.timeout(30):
            await writer.flushed()
        await writer.close()
        logged: dict[str, str] = {}
        gapless = []
        for _, sid, _ in claimed:
            events = await eventlog.read_after(redis, sid, 0)
            gapless.append([e.seq for e in events] == list(range(1, len(events) + 1)))
            logged[sid] = "".join(
                msgspec.json.decode(e.data, type=ev.TextDelta).text for e in events
            )
        stats = await redis.info("commandstats")
        transactions = stats.get("cmdstat_exec", {"calls": 0})["calls"] - execs
        assert (transactions > 0) == (way == "transaction"), transactions
        await redis.aclose()
        return logged, put, gapless

    logged, put, gapless = asyncio.run(scenario())
    assert logged == put
    assert all(gapless)


def test_a_gather_ends_once_its_time_is_up_on_the_workers_event_loop(redis_url: str) -> None:
    """uvloop's clock (the worker's loop) moves in whole milliseconds: a gather of
    5.05 ms that worked its wait out again once its timeout fired found a hair
    left until the next tick, and went round again, each new timeout firing at
    once (some 20 to 60 times a call). It ends once a call now."""

    async def scenario() -> float:
        redis = Redis.from_url(redis_url)
        store = SessionStore(redis)
        claimed = [await _claimed(store) for _ in range(3)]
        writer = EventWriter(store, max_gather=0.02, gather_per_turn=0.0050505 / 3)
        turns = [writer.open(sid, turn, lambda: None) for _, sid, turn in claimed]
        for (sandbox, sid, turn), part in zip(claimed, turns, strict=True):
            part.put(_delta(sid, sandbox.id, turn, "first"))
        await writer.flushed()
        real = asyncio.timeout
        entered = 0

        def counted(delay: float | None) -> asyncio.Timeout:
            nonlocal entered
            entered += 1
            return real(delay)

        asyncio.timeout = counted  # type: ignore[assignment]
        sandbox, sid, turn = claimed[0]
        try:
            for n in range(30):
                turns[0].put(_delta(sid, sandbox.id, turn, f"{n}"))
                await writer.flushed()
        finally:
            asyncio.timeout = real
            await writer.close()
            await redis.aclose()
        return entered / 30

    assert uvloop.run(scenario()) <= 2


def test_a_worker_cannot_end_a_turn_whose_lease_it_no_longer_holds(redis_url: str) -> None:
    """A turn its worker suspended for approval (say, the suspension's reply was
    lost and the worker, seeing an error, went on to end the turn as failed) or
    that another worker holds is not the first worker's to end: its end is
    refused and the waiting turn stays as it is (before: the end went through,
    leaving the approval pending on a turn that was over)."""

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        assert await store.start_turn(sid, turn, "w1")
        done = failed_event(sid, sandbox.id, turn)
        assert await store.finish_turn(sid, turn, "worker", None, done, worker_id="w2") == 0
        approvals = ApprovalStore(store.redis, log_max_events=100, log_ttl_seconds=60)
        call = PendingApproval(
            tool_use_id="toolu_1", name="bash", input={}, index=0, expires_at=now_rfc3339()
        )
        record = SuspendedTurn(
            turn_id=turn, message_id="m", iteration=0, blocks=[], usage=ev.Usage(), calls=[]
        )
        suspend = approvals.suspend(
            sid=sid, worker_id="w1", record=record, pending=[call], events=[], deadline=1e10
        )
        assert await suspend
        assert await store.finish_turn(sid, turn, "worker", None, done, worker_id="w1") == 0
        state = await store.turn_state(sid)
        assert state is not None and state.state == "running" and state.awaiting
        assert await approvals.waiting(sid) is not None

    run(redis_url, scenario)


def test_a_start_sent_again_by_its_worker_after_a_lost_reply_hands_the_turn_back(
    redis_url: str,
) -> None:
    """The worker's START_TURN went through but its reply was lost (a socket
    timeout), so it asks again: it gets the turn, once counted, with the lease it
    took (before: refused as started, so no one ran the turn until a reaper
    ended it `worker_lost`). Another worker is still refused."""

    async def scenario(store: SessionStore) -> None:
        _, sid, turn = await _claimed(store)
        counted = await store.redis.hget(keys.METRICS_COUNTERS, metrics.STARTED)
        first = await store.start_turn(sid, turn, "w1")
        assert await store.renew_lease(sid, turn, "w1") == 1
        again = await store.start_turn(sid, turn, "w1")
        assert first is not None and again is not None
        assert [m.id for m in again.history] == [m.id for m in first.history]
        assert await store.start_turn(sid, turn, "w2") is None
        state = await store.turn_state(sid)
        assert state is not None and state.lease_epoch == 2  # not taken afresh
        after = await store.redis.hget(keys.METRICS_COUNTERS, metrics.STARTED)
        assert int(after or 0) - int(counted or 0) == 1

    run(redis_url, scenario)


def test_a_suspension_sent_again_after_a_lost_reply_writes_once(redis_url: str) -> None:
    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        assert await store.start_turn(sid, turn, "w1")
        approvals = ApprovalStore(store.redis, log_max_events=100, log_ttl_seconds=60)
        record = SuspendedTurn(
            turn_id=turn, message_id=new_id(), iteration=0, blocks=[], usage=ev.Usage(), calls=[]
        )

        async def suspend(worker: str, what: SuspendedTurn = record) -> bool:
            return await approvals.suspend(
                sid=sid,
                worker_id=worker,
                record=what,
                pending=[],
                events=[_delta(sid, sandbox.id, turn, "x")],
                deadline=time.time() + 60,
            )

        assert not await suspend("w2")  # not w2's turn
        assert await suspend("w1")
        assert await suspend("w1")  # the same call again: done already, nothing written
        assert await store.redis.get(keys.seq(sid)) == b"1"
        state = await store.turn_state(sid)
        assert state is not None and state.awaiting and not state.started
        # Another worker's (a stale one's) suspension is not mistaken for it.
        assert not await suspend("w2", msgspec.structs.replace(record, message_id=new_id()))

    run(redis_url, scenario)


def test_a_claim_names_its_reply_channel_in_the_same_write_and_drops_a_stale_one(
    own_redis: RedisServer,
) -> None:
    """A blocking send's claim stores its reply channel with the turn's fields (one
    HSET); a later claim without one leaves no earlier turn's channel behind. (A
    Redis of its own: no worker takes its jobs, no one else's HSETs are counted.)"""

    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
        first = new_id()
        before = await store.redis.info("commandstats")
        job = queued_job(TurnJob(session_id=sid, turn_id=first))
        claimed = await store.claim_turn(
            sid, "t", first, _user(sid, first), job, "ss:api:x:replies"
        )
        assert claimed.status == "ok"
        after = await store.redis.info("commandstats")
        assert after["cmdstat_hset"]["calls"] - before["cmdstat_hset"]["calls"] == 1
        assert await store.redis.hget(keys.session(sid), "reply_to") == b"ss:api:x:replies"
        assert await store.interrupt_unstarted(sid, sandbox.id, first)
        second = new_id()
        job = queued_job(TurnJob(session_id=sid, turn_id=second))
        assert (await store.claim_turn(sid, "t", second, _user(sid, second), job)).status == "ok"
        assert await store.redis.hget(keys.session(sid), "reply_to") is None
        assert await store.redis.hget(keys.session(sid), "turn_id") == second.encode()

    run(own_redis.url, scenario)


async def _command_calls(redis: Redis, action: Awaitable[T]) -> tuple[T, dict[str, int]]:
    """What `action` (not yet awaited) returned, and the calls of each command it
    made Redis run (those inside scripts included; INFO's own left out)."""
    before = await redis.info("commandstats")
    result = await action
    return result, command_calls(before, await redis.info("commandstats"))


def _figures(i: int) -> metrics.TurnFigures:
    """Figures that differ from turn to turn: durations across buckets, some
    turns unmeasured, tool calls on some."""
    return metrics.TurnFigures(
        events=i,
        duration_seconds=None if i % 5 == 4 else 0.03 * (i + 1),
        first_token_seconds=0.004 * (i + 1),
        tools=[("bash", 0.02 * i), ("read_file", 0.5)] if i % 3 == 0 else [],
    )


def test_a_turn_s_end_tallies_its_figures_in_one_command_and_every_few_ends_folds_them(
    tmp_path: Path,
) -> None:
    """A turn's end puts what it adds to the fleet's counters, histograms and
    recent durations in one tally (one RPUSH), where it was one HINCRBY per
    field and an LPUSH and LTRIM (eight to twelve commands here); every
    `tally_fold_at` ends the script that ends one folds them all in. Read at any
    point (`read_folded`, the ops report, /metrics), the figures are what
    adding each turn's increments at its end gives. (A Redis of its own: the
    commands counted are this test's only.)"""
    server = RedisServer(tmp_path)
    fold_at = 4
    turns = 2 * fold_at + 1

    async def scenario(store: SessionStore) -> None:
        store.tally_fold_at = fold_at
        expected: list[dict[str, int]] = [{} for _ in metrics.TALLIED]
        durations: list[int] = []
        for i in range(turns):
            sandbox, sid, turn = await _claimed(store)
            assert await store.start_turn(sid, turn, "w1") is not None
            counted = expected[0]  # a start is counted as it happens (START_TURN)
            counted[metrics.STARTED] = counted.get(metrics.STARTED, 0) + 1
            ids = TurnIds(session_id=sid, sandbox_id=sandbox.id, turn_id=turn, message_id="m")
            message = assistant_message(ids, "done")
            end = completed(ids, message, "end_turn", ev.Usage())
            figures = _figures(i)
            seq, calls = await _command_calls(
                store.redis,
                store.finish_turn(sid, turn, "worker", message, end, figures, worker_id="w1"),
            )
            assert seq > 0
            for key, field, by in metrics.increments("completed", "end_turn", figures):
                fields = expected[metrics.TALLIED.index(key)]
                fields[field] = fields.get(field, 0) + by
            if figures.duration_seconds is not None:
                durations.insert(0, round(figures.duration_seconds * 1000))
            pending = await store.redis.llen(keys.METRICS_TALLIES)
            if (i + 1) % fold_at:
                # The message and the tally; no counter, bucket or list.
                assert calls.get("rpush") == 2, calls
                assert not {"hincrby", "lpush", "ltrim", "expire"} & set(calls), calls
                assert pending == (i + 1) % fold_at
            else:
                assert pending == 0
                assert calls.get("lpush") == 1 and calls.get("ltrim") == 1, calls
                hashes = [
                    {k.decode(): int(v) for k, v in (await store.redis.hgetall(key)).items()}
                    for key in metrics.TALLIED
                ]
                assert hashes == expected
                kept = await store.redis.lrange(keys.TURN_DURATIONS, 0, -1)
                assert [int(d) for d in kept] == durations
                bucket = keys.turn_outcomes(int(time.time()) // keys.STATS_BUCKET_SECONDS)
                assert await store.redis.hgetall(bucket) == {
                    b"session_completed:end_turn": str(i + 1).encode()
                }
                ttl = await store.redis.ttl(bucket)
                assert metrics.OUTCOME_TTL_SECONDS - 60 < ttl <= metrics.OUTCOME_TTL_SECONDS
            hour = metrics.last_hour_buckets(time.time())
            folded = await metrics.read_folded(store.redis, hour)
            assert folded.hashes == expected
            assert folded.durations == durations
            assert folded.outcomes == {"session_completed:end_turn": i + 1}

    try:
        run(server.url, scenario)
    finally:
        server.stop()


def test_figures_read_while_turns_end_and_fold_count_each_turn_once(redis_url: str) -> None:
    """Turns ending on many connections at once, folding every second tally,
    while the figures are read over and over: a read sees the hashes and the
    tallies not yet folded together, so no count ever goes back or past the
    turns that ended, and at the end each turn is counted once."""
    turns = 60
    finished = metrics.finished_field("completed", "end_turn")

    async def scenario(store: SessionStore) -> None:
        store.tally_fold_at = 2
        await store.redis.delete(keys.METRICS_COUNTERS, keys.METRICS_TALLIES)
        claimed = []
        for _ in range(turns):
            sandbox, sid, turn = await _claimed(store)
            assert await store.start_turn(sid, turn, "w1") is not None
            claimed.append((sandbox, sid, turn))
        ending = ended = 0  # ends sent, ends whose reply came

        async def end(sandbox: Sandbox, sid: str, turn: str) -> None:
            nonlocal ending, ended
            ids = TurnIds(session_id=sid, sandbox_id=sandbox.id, turn_id=turn, message_id="m")
            message = assistant_message(ids, "done")
            end = completed(ids, message, "end_turn", ev.Usage())
            ending += 1
            assert await store.finish_turn(
                sid, turn, "worker", message, end, _figures(1), worker_id="w1"
            )
            ended += 1

        reads = 0

        async def read() -> None:
            nonlocal reads
            last = 0
            for _ in range(2000):
                before = ended
                counters = (await metrics.read_folded(store.redis)).hashes[0]
                count = counters.get(finished, 0)
                assert before <= count <= ending and count >= last, (before, count, ending)
                last = count
                reads += 1
                if count == turns:
                    return

        await asyncio.wait_for(
            asyncio.gather(read(), read(), *(end(*c) for c in claimed)), timeout=60
        )
        assert reads > 2  # the reads went on while turns ended
        assert (await metrics.read_folded(store.redis)).hashes[0][finished] == turns

    run(redis_url, scenario)


def test_a_claim_removes_what_an_earlier_turn_left_only_when_it_is_there(tmp_path: Path) -> None:
    """A turn that ended as turns do leaves none of its lease, interrupt or reply
    channel behind, so the next claim deletes nothing (one command less a send);
    a session that kept some (a turn ended otherwise) still has them removed, and
    a claim that names a reply channel keeps its own."""
    server = RedisServer(tmp_path)

    async def scenario(store: SessionStore) -> None:
        sandbox, sid, turn = await _claimed(store)
        assert await store.finish_turn(
            sid, turn, "unstarted", None, failed_event(sid, sandbox.id, turn)
        )
        second = new_id()
        job = queued_job(TurnJob(session_id=sid, turn_id=second))
        claim = lambda turn_id, job, reply_to="": store.claim_turn(  # noqa: E731
            sid, "t", turn_id, _user(sid, turn_id), job, reply_to
        )
        result, calls = await _command_calls(store.redis, claim(second, job))
        assert result.status == "ok"
        assert "hdel" not in calls, calls
        assert await store.finish_turn(
            sid, second, "unstarted", None, failed_event(sid, sandbox.id, second)
        )
        left = {
            "started": "w0",
            "interrupt": "x",
            "lease_epoch": "3",
            "reply_to": "old",
            "job_id": "old:continuation",
        }
        for reply_to in ("", "mine"):
            await store.redis.hset(keys.session(sid), mapping=left)
            third = new_id()
            job = queued_job(TurnJob(session_id=sid, turn_id=third))
            result, calls = await _command_calls(store.redis, claim(third, job, reply_to))
            assert result.status == "ok" and calls.get("hdel") == 1, calls
            fields = await store.redis.hmget(keys.session(sid), *left)
            assert fields == [None, None, None, reply_to.encode() or None, None]
            assert await store.finish_turn(
                sid, third, "unstarted", None, failed_event(sid, sandbox.id, third)
            )

    try:
        run(server.url, scenario)
    finally:
        server.stop()


def test_huge_figures_and_unreadable_tallies_neither_fail_a_turn_s_end_nor_count_twice(
    tmp_path: Path,
) -> None:
    """The fold runs after the turn's end has written, so it must not fail:
    sums past 1e17 (Lua holds numbers as doubles, which Redis would write as
    1e+17 and HINCRBY refuse), tallies that are not of a tally's shape, and
    entries naming a hash this version does not know (one of a later version's)
    are each taken or left out, by the fold and the readers alike. Every end
    goes through, and every turn counts once. (A Redis of its own.)"""
    server = RedisServer(tmp_path)
    fold_at = 4
    huge = 2e10  # seconds to the first token: 2e16 µs, six of them past 1e17

    async def scenario(store: SessionStore) -> None:
        store.tally_fold_at = fold_at
        bucket = int(time.time()) // keys.STATS_BUCKET_SECONDS
        later = msgspec.json.encode([7, [[99, "new|0", 1], [1, metrics.EVENTS, 2]], bucket, "x:y"])
        await store.redis.rpush(
            keys.METRICS_TALLIES,
            b"not a tally",
            b'{"duration_ms": 1}',
            b'[1, [[1, "events", 1.5]], 0, "a:b"]',
            later,
        )
        expected: list[dict[str, int]] = [{metrics.EVENTS: 2}, {}, {}, {}]
        outcomes = {"x:y": 1}
        durations = [7]
        for i in range(2 * fold_at + 2):
            sandbox, sid, turn = await _claimed(store)
            assert await store.start_turn(sid, turn, "w1") is not None
            counted = expected[0]
            counted[metrics.STARTED] = counted.get(metrics.STARTED, 0) + 1
            ids = TurnIds(session_id=sid, sandbox_id=sandbox.id, turn_id=turn, message_id="m")
            message = assistant_message(ids, "done")
            end = completed(ids, message, "end_turn", ev.Usage())
            figures = metrics.TurnFigures(events=i, duration_seconds=0.5, first_token_seconds=huge)
            assert await store.finish_turn(
                sid, turn, "worker", message, end, figures, worker_id="w1"
            )
            for key, field, by in metrics.increments("completed", "end_turn", figures):
                fields = expected[metrics.TALLIED.index(key)]
                fields[field] = fields.get(field, 0) + by
            outcomes["session_completed:end_turn"] = i + 1
            durations.insert(0, 500)
            hour = metrics.last_hour_buckets(time.time())
            folded = await metrics.read_folded(store.redis, hour)
            assert (folded.hashes, folded.outcomes) == (expected, outcomes)
            assert folded.durations == durations
        # The unreadable four and the first end were folded together, then
        # every fourth end: nine ends are in the hashes, the tenth pending.
        assert await store.redis.llen(keys.METRICS_TALLIES) == 1
        first_token = keys.metrics_histogram(metrics.FIRST_TOKEN.name)
        sum_us = await store.redis.hget(first_token, "|sum_us")
        assert int(sum_us or 0) == 9 * round(huge * 1_000_000)  # exact, past 1e17

    try:
        run(server.url, scenario)
    finally:
        server.stop()


def test_a_turn_s_end_forgets_its_job_in_the_same_step(redis_url: str) -> None:
    """The worker's end of a turn deletes its job's in-progress mark, try count
    and record and removes its queue entry, as the claim queued it in one step;
    an end that is not stored (another worker's lease) leaves them be."""

    async def scenario(store: SessionStore) -> None:
        sandbox = await store.create_sandbox("t", {})
        sid = (await store.create_session("t", sandbox.id, {}, DEFAULT_AGENT)).id
        turn = new_id()
        await store.claim_turn(sid, "t", turn, _user(sid, turn), queued_job(TurnJob(sid, turn)))
        job_keys = [f"arq:in-progress:{turn}", f"arq:retry:{turn}", f"arq:job:{turn}"]
        await store.redis.set(job_keys[0], 1)  # as the worker's take does
        await store.redis.set(job_keys[1], 1)
        assert await store.start_turn(sid, turn, "w1") is not None
        ids = TurnIds(session_id=sid, sandbox_id=sandbox.id, turn_id=turn, message_id="m")
        end = completed(ids, assistant_message(ids, "done"), "end_turn", ev.Usage())
        assert not await store.finish_turn(
            sid, turn, "worker", None, end, worker_id="w2", job_id=turn
        )
        assert await store.redis.exists(*job_keys) == 3
        assert await store.redis.zscore(keys.QUEUE, turn) is not None
        assert await store.finish_turn(sid, turn, "worker", None, end, worker_id="w1", job_id=turn)
        assert await store.redis.exists(*job_keys) == 0
        assert await store.redis.zscore(keys.QUEUE, turn) is None

    run(redis_url, scenario)
