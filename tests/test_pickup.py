"""The worker's job pickup when the store fails it."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from arq.connections import ArqRedis
from arq.worker import func
from conftest import RedisServer, Stack
from helpers import command_calls, new_session, text_message, wait_until
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys
from shared.queue import connect, deserialize_job_data, serialize_job_data
from worker.pickup import RETRY_KEY_TTL_S, FastPickupWorker, _TakenJob


async def _job(ctx: dict[str, Any]) -> str:
    return "ran"


def _worker(pool: ArqRedis, queue: str, **options: Any) -> FastPickupWorker:
    """An in-process worker of `_job` on a queue of its own (`keys.QUEUE:<queue>`)."""
    return FastPickupWorker(
        functions=[func(_job, name="job")],
        redis_pool=pool,
        queue_name=f"{keys.QUEUE}:{queue}",
        job_serializer=serialize_job_data,
        job_deserializer=deserialize_job_data,
        on_control=lambda data: None,
        handle_signals=False,
        **options,
    )


def test_a_pickup_the_store_fails_gives_its_slot_back(redis_url: str) -> None:
    """Taking a job times out (a stalled Redis): the slot it held is free again,
    so a worker with one slot can still take the next job."""

    async def scenario() -> None:
        pool = await connect(redis_url)
        worker = _worker(pool, "pickup-test", max_jobs=1)

        async def stalled(**kwargs: Any) -> Any:
            raise RedisTimeoutError("Timeout reading from socket")

        worker._take_job = stalled  # type: ignore[assignment]
        try:
            for _ in range(3):
                with pytest.raises(RedisTimeoutError):
                    await asyncio.wait_for(worker.start_jobs([b"some-job"]), 1)
            assert worker.job_counter == 0
            assert not worker.sem.locked()
        finally:
            await pool.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("keep_result", [0, 60])
def test_a_finished_job_leaves_only_its_result_behind(
    own_redis: RedisServer, keep_result: int
) -> None:
    """A job that ran leaves no job record, retry count, in-progress mark or queue
    entry, only its result if it is kept, and all in one script call. (A Redis of
    its own: the commands counted are this worker's only.)"""

    async def scenario() -> None:
        pool = await connect(own_redis.url)
        worker = _worker(
            pool, f"finish-test-{keep_result}", keep_result=keep_result, poll_delay=0.05
        )
        queue = worker.queue_name
        running = asyncio.create_task(worker.main())
        try:
            before = await pool.info("commandstats")
            job = await pool.enqueue_job("job", _queue_name=queue)
            assert job is not None
            for _ in range(200):
                if worker.jobs_complete == 1 and not worker.tasks:
                    break
                await asyncio.sleep(0.05)
            assert worker.jobs_complete == 1
            left = sorted(k.decode() for k in await pool.keys(f"arq:*{job.job_id}*"))
            assert await pool.zcard(queue) == 0
            after = await pool.info("commandstats")
            calls = {
                name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
                for name in after
            }
            if keep_result:
                assert left == [f"arq:result:{job.job_id}"]
                assert (await job.result(timeout=1)) == "ran"
                assert 0 < await pool.pttl(f"arq:result:{job.job_id}") <= keep_result * 1000
            else:
                assert left == []
            # The one MULTI is arq's enqueue: the job is read as it is taken
            # (TAKE_JOB), not in a transaction of arq's, and the finish has
            # none; it removes the queue entry, not one from the abort set.
            assert calls.get("cmdstat_multi") == 1, calls
            assert calls.get("cmdstat_zrem") == 1, calls
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await pool.aclose()

    asyncio.run(scenario())


def test_a_turn_leaves_only_its_jobs_result(stack: Stack) -> None:
    """Through the service: once a turn's job is finished, arq keeps only its
    result, for a minute (the turn's end forgets the rest, arq then stores the
    result)."""
    store = redis.Redis.from_url(stack.env["SANDSTREAM_REDIS_URL"])
    with stack.client() as client:
        sid = new_session(client)
        reply = client.post(f"/sessions/{sid}/messages", json=text_message("hello"))
        assert reply.status_code == 200, reply.text
        turn_id = reply.json()["turn_id"]
    wait_until(lambda: store.exists(f"arq:result:{turn_id}"), 10, "the job's result")
    assert store.keys(f"arq:*{turn_id}*") == [f"arq:result:{turn_id}".encode()]
    assert 0 < store.pttl(f"arq:result:{turn_id}") <= 60_000


def test_a_turn_s_job_is_forgotten_by_its_end_alone(own_redis: RedisServer, tmp_path: Path) -> None:
    """Through the service: the turn's end forgets its job (FINISH_TURN) and the
    worker is told, so arq stores only the result: one ZREM a turn, the end's,
    where arq's forget script would remove the queue entry again. (A Redis of
    its own: the commands counted are this turn's and the processes' own.)"""
    stack = Stack(own_redis.url, tmp_path / "stack", {})
    try:
        store = own_redis.client()
        with stack.client() as client:
            sid = new_session(client)
            before = store.info("commandstats")
            reply = client.post(f"/sessions/{sid}/messages", json=text_message("hello"))
            assert reply.status_code == 200, reply.text
            turn_id = reply.json()["turn_id"]
        wait_until(lambda: store.exists(f"arq:result:{turn_id}"), 10, "the job's result")
        assert command_calls(before, store.info("commandstats"))["zrem"] == 1
        assert store.keys(f"arq:*{turn_id}*") == [f"arq:result:{turn_id}".encode()]
    finally:
        stack.stop()


@pytest.mark.parametrize("lost_in", ["listener", "main loop", "both"])
def test_a_worker_stops_though_a_cancellation_is_lost(own_redis: RedisServer, lost_in: str) -> None:
    """On Python 3.11, `asyncio.wait_for` (redis-py's sends under a socket
    timeout) can drop a cancellation that meets the awaited call's end. A worker
    whose main loop or pub/sub listener lost the one arq sends on SIGTERM went on
    forever. Here the first cancellation of each is lost as that race loses it:
    the worker still stops, within its poll interval."""

    async def scenario() -> None:
        pool = await connect(own_redis.url, socket_timeout=5)
        worker = _worker(pool, "stop-test", poll_delay=0.5)
        lost: list[str] = []

        def losing_one(name: str, call: Callable[..., Awaitable[Any]]) -> Any:
            async def wrapped(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await call(*args, **kwargs)
                except asyncio.CancelledError:
                    if name in lost:
                        raise
                    lost.append(name)
                    return None  # as wait_for returns the result it raced with

            return wrapped

        if lost_in in ("listener", "both"):
            make_pubsub = pool.pubsub

            def pubsub() -> Any:
                real = make_pubsub()
                real.get_message = losing_one("listener", real.get_message)
                return real

            pool.pubsub = pubsub  # type: ignore[method-assign]
        if lost_in in ("main loop", "both"):
            poll = worker._poll_iteration

            async def slow_poll() -> None:
                await poll()
                await asyncio.sleep(10)  # the cancellation arrives in here

            worker._poll_iteration = losing_one("main loop", slow_poll)  # type: ignore[method-assign]
        worker.main_task = asyncio.create_task(worker.main())
        try:
            await asyncio.sleep(0.3)  # listening, and polling the queue
            worker.handle_sig(signal.SIGTERM)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(worker.main_task), 5)
        finally:
            await pool.aclose()
        assert sorted(lost) == sorted({"listener", "main loop"} if lost_in == "both" else {lost_in})
        assert worker.main_task.done()

    asyncio.run(scenario())


def test_a_job_is_taken_and_read_in_one_call_and_one_not_due_is_left_unmarked(
    own_redis: RedisServer,
) -> None:
    """Taking a due job sets its in-progress mark only if absent (SET NX, where
    EXISTS and PSETEX were two commands), reads its score, and reads the job and
    counts its try as arq's `run_job` would next in a MULTI/EXEC of its own:
    arq runs the job from what the take read, and the turn costs four commands
    and a round trip less. A job not due yet, or taken already, is not taken,
    and keeps no mark of this worker's. (A Redis of its own: the commands
    counted are this test's only.)"""
    gate = asyncio.Event()

    async def gated(ctx: dict[str, Any]) -> str:
        await gate.wait()
        return f"ran try {ctx['job_try']}"

    async def scenario() -> None:
        pool = await connect(own_redis.url)
        worker = _worker(pool, "take-test", max_jobs=5)
        worker.functions["job"] = func(gated, name="job")  # type: ignore[assignment]
        try:
            due = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            later = await pool.enqueue_job("job", _queue_name=worker.queue_name, _defer_by=60)
            assert due is not None and later is not None

            async def calls(action: Awaitable[object]) -> dict[str, int]:
                before = await pool.info("commandstats")
                await action
                counted = command_calls(before, await pool.info("commandstats"))
                return {k: v for k, v in counted.items() if k not in ("evalsha", "script|load")}

            taken = await calls(worker.start_jobs([due.job_id.encode()]))
            assert list(worker.tasks) == [due.job_id]
            # SET NX of its in-progress mark, and of its try count: its first.
            assert taken == {"set": 2, "zscore": 1, "get": 1}, taken
            mark = f"arq:in-progress:{due.job_id}"
            assert 0 < await pool.pttl(mark) <= worker.in_progress_timeout_s * 1000
            retries = f"arq:retry:{due.job_id}"
            assert await pool.get(retries) == b"1"
            assert 0 < await pool.ttl(retries) <= RETRY_KEY_TTL_S

            async def run() -> None:
                gate.set()
                await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 10)

            ran = await calls(run())
            assert "multi" not in ran and "get" not in ran, ran  # nothing read again
            assert (await due.result(timeout=1)) == "ran try 1"

            await worker.start_jobs([later.job_id.encode()])  # not due: not taken, no mark
            assert not await pool.exists(f"arq:in-progress:{later.job_id}")
            assert not await pool.exists(f"arq:retry:{later.job_id}")
            elsewhere = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            assert elsewhere is not None
            theirs = f"arq:in-progress:{elsewhere.job_id}"
            await pool.set(theirs, b"another worker's", px=30_000)
            await worker.start_jobs([elsewhere.job_id.encode()])  # another's: its mark stays
            assert await pool.get(theirs) == b"another worker's"
            assert not worker.tasks
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_what_the_take_read_decides_as_arq_would(own_redis: RedisServer) -> None:
    """arq's own checks run on what the take read: a job tried as often as its
    function allows already is failed without running, and so is one whose
    record is gone; each leaves its failure as the result."""
    ran: list[str] = []

    async def job(ctx: dict[str, Any]) -> str:
        ran.append(ctx["job_id"])
        return "ran"

    async def scenario() -> None:
        pool = await connect(own_redis.url)
        worker = _worker(pool, "take-checks", max_jobs=5)
        worker.functions["job"] = func(job, name="job", max_tries=2)  # type: ignore[assignment]
        try:
            tried = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            gone = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            fresh = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            assert tried is not None and gone is not None and fresh is not None
            await pool.set(f"arq:retry:{tried.job_id}", 2)  # its third try now
            await pool.delete(f"arq:job:{gone.job_id}")
            ids = [j.job_id.encode() for j in (tried, gone, fresh)]
            await worker.start_jobs(ids)
            await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 10)
            assert ran == [fresh.job_id]
            assert worker.jobs_failed == 2 and worker.jobs_complete == 1
            info = await tried.result_info()
            assert info is not None and not info.success
            assert "max 2 retries exceeded" in str(info.result)
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_a_job_its_turn_s_end_forgot_has_only_its_result_stored(own_redis: RedisServer) -> None:
    """A job the end of its turn forgot (`SessionStore.finish_turn`, its job's
    keys deleted and its queue entry removed in the same step) has only its
    result stored as it returns: one SET, no script of its own. The worker
    keeps such a job's id only while the job runs. (A Redis of its own: the
    commands counted are this test's only.)"""

    async def scenario() -> None:
        pool = await connect(own_redis.url)
        worker = _worker(pool, "forgot-test", keep_result=60)

        async def ends_its_turn(ctx: dict[str, Any]) -> str:
            job_id = ctx["job_id"]
            await pool.delete(
                f"arq:in-progress:{job_id}", f"arq:retry:{job_id}", f"arq:job:{job_id}"
            )
            await pool.zrem(worker.queue_name, job_id)
            worker.job_forgotten(job_id)
            return "ended"

        worker.functions["job"] = func(ends_its_turn, name="job")  # type: ignore[assignment]
        try:
            job = await pool.enqueue_job("job", _queue_name=worker.queue_name)
            assert job is not None
            await worker.start_jobs([job.job_id.encode()])
            before = await pool.info("commandstats")
            await asyncio.wait_for(asyncio.gather(*worker.tasks.values()), 10)
            calls = command_calls(before, await pool.info("commandstats"))
            assert calls == {"del": 1, "zrem": 1, "set": 1}, calls  # the job's, then arq's
            assert await pool.keys(f"arq:*{job.job_id}*") == [f"arq:result:{job.job_id}".encode()]
            assert (await job.result(timeout=1)) == "ended"
            assert 0 < await pool.pttl(f"arq:result:{job.job_id}") <= 60_000
            assert not worker._jobs_forgotten  # let go of as the job finished
            worker.job_forgotten("not-running")  # told late (its job is over): not kept
            assert not worker._jobs_forgotten
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_what_arq_reads_of_a_taken_job_is_answered_only_as_the_take_read_it(
    redis_url: str,
) -> None:
    """arq's first transaction of a job is answered from the take (`_TakenJob`)
    only when it asks for what the take did: anything else (an arq that reads
    more, or reads another job's keys) is an error, never an answer made up; and
    a worker that would abort jobs, whose first read includes the abort set, is
    refused as it is made."""
    taken = _TakenJob("job-1", b"record", 1)

    async def read(commands: list[tuple[str, ...]]) -> list[object]:
        async with taken.pipeline(transaction=True) as pipe:
            for name, *args in commands:
                getattr(pipe, name)(*args)
            return await pipe.execute()

    with pytest.raises(RuntimeError, match="otherwise than TAKE_JOB did"):
        asyncio.run(read([("get", "arq:job:job-2")]))
    taken = _TakenJob("job-1", b"record", 1)
    read_as_arq = [
        ("get", "arq:job:job-1"),
        ("incr", "arq:retry:job-1"),
        ("expire", "arq:retry:job-1", RETRY_KEY_TTL_S),
    ]
    assert asyncio.run(read(read_as_arq)) == [b"record", 1, True]
    assert taken.read and taken.job is None  # answered once, the record let go

    async def make() -> None:
        pool = await connect(redis_url)
        try:
            with pytest.raises(ValueError, match="allow_abort_jobs"):
                _worker(pool, "abort-test", allow_abort_jobs=True)
        finally:
            await pool.aclose()

    asyncio.run(make())
