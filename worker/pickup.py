"""An arq worker that wakes on a pub/sub signal instead of polling every 0.5 s.

arq finds work by polling its queue (a sorted set) every `poll_delay`. That
costs an idle worker two commands a second and a queued turn up to half a
second of waiting. Here the worker holds one pub/sub connection: the API
publishes each queued job's id on the wake channel, the worker tries to take that
job at once (one Lua call; with several workers, one wins), and the timed poll
remains only as a slow fallback (for a missed signal, a deferred job, or jobs
left waiting for a free slot). The same connection carries interrupt requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from signal import Signals
from typing import Any, cast

from arq.connections import ArqRedis, log_redis_info
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.exceptions import RedisError

from shared import keys, scripts

logger = logging.getLogger("sandstream.worker")


# Take a queued job if it is due and nobody has it: what arq's `start_jobs` does
# with WATCH/EXISTS/ZSCORE/MULTI/EXEC (four round trips), in one. A due job's
# in-progress key is set only if absent (SET NX): two commands inside for a job
# taken, where EXISTS, ZSCORE and PSETEX were three. A job taken is also
# read and its try counted, as arq's `run_job` would next in a transaction of
# its own (MULTI, GET, INCR, EXPIRE, EXEC: three commands and a round trip more
# a turn, its first try being one SET NX here); `run_job` is handed what was
# read (`_TakenJob`).
# KEYS: in-progress key, queue, job key, retry key.
# ARGV: job id, now ms, in-progress ttl ms, retry key ttl s.
# -> {score, the job or false when it expired, its try} | false
_TAKE_JOB = """
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
if not redis.call('SET', KEYS[1], '1', 'PX', ARGV[3], 'NX') then return false end
local job = redis.call('GET', KEYS[3])
-- A job's first try (the count is not there yet) sets it in one command.
local try = 1
if not redis.call('SET', KEYS[4], 1, 'EX', ARGV[4], 'NX') then
  try = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[4])
end
return {score, job, try}
"""
# How long arq's `run_job` keeps a job's try count (its own literal).
RETRY_KEY_TTL_S = 88400


# A finished job forgotten, its result kept if it has one: what arq's
# `finish_job` does with MULTI, SET, two ZREMs, DEL and EXEC (six commands a
# turn), in one call. arq's abort set is left alone: this worker never aborts
# jobs (`allow_abort_jobs` is off) and nothing adds to it.
# KEYS: in-progress key, retry key, job key, queue, result key.
# ARGV: job id[, result, result expiry ms].
_FORGET_JOB = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[2] then redis.call('SET', KEYS[5], ARGV[2], 'PX', ARGV[3]) end
"""


class _TakenJob:
    """A job as TAKE_JOB read it, for arq's `run_job` of the job to start from
    instead of reading it again: its first transaction (GET of the job, INCR and
    EXPIRE of its try count) is answered from here, once (`FastPickupWorker.pool`
    hands it to the task running the job)."""

    def __init__(self, job_id: str, job: bytes | None, tries: int) -> None:
        self.job_id = job_id
        self.job = job
        self.tries = tries
        self.read = False  # the transaction was answered
        self._queued: list[tuple[str, ...]] = []

    def pipeline(self, transaction: bool = True) -> _TakenJob:
        assert transaction and not self.read, "arq's run_job reads its job once"
        return self

    async def __aenter__(self) -> _TakenJob:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def get(self, name: str) -> None:
        self._queued.append(("get", name))

    def incr(self, name: str) -> None:
        self._queued.append(("incr", name))

    def expire(self, name: str, seconds: int) -> None:
        self._queued.append(("expire", name, str(seconds)))

    async def execute(self) -> list[object]:
        retry_key = retry_key_prefix + self.job_id
        expected = [
            ("get", job_key_prefix + self.job_id),
            ("incr", retry_key),
            ("expire", retry_key, str(RETRY_KEY_TTL_S)),
        ]
        if self._queued != expected:
            raise RuntimeError(
                f"arq read job {self.job_id} otherwise than TAKE_JOB did: {self._queued}"
            )
        self.read = True
        # Tasks the job starts carry this object in their context: the record
        # goes with the answer, not with them.
        job, self.job = self.job, None
        return [job, self.tries, True]


# The job TAKE_JOB read, in the task that runs it.
_taken: contextvars.ContextVar[_TakenJob | None] = contextvars.ContextVar("taken", default=None)


class FastPickupWorker(Worker):
    def __init__(
        self,
        *args: Any,
        on_control: Callable[[bytes], None],
        fast_pickup: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.allow_abort_jobs:
            # arq would then also read the abort set in its first transaction of
            # a job, which the take does not (`_TakenJob`), and our finish leaves
            # that set alone.
            raise ValueError("FastPickupWorker does not abort jobs (allow_abort_jobs)")
        self._on_control = on_control
        # Jobs the end of their turn forgot already (`SessionStore.finish_turn`,
        # its `job_id`; `job_forgotten`): only their result is left to store.
        self._jobs_forgotten: set[str] = set()
        self._fast_pickup = fast_pickup
        self._wake = asyncio.Event()
        # Job ids from wake-up signals, taken without polling the queue.
        self._woken: deque[str] = deque()
        # A full poll of the queue is due: after a reconnect, or when a slot
        # frees up while jobs were left waiting for one.
        self._poll_due = True
        self._starved = False
        assert self._pool is not None, "FastPickupWorker needs redis_pool"
        self._take_job = scripts.register(self._pool, _TAKE_JOB)
        self._forget_job = scripts.register(self._pool, _FORGET_JOB)
        # Set as arq stops the worker (its `on_stop`, after it cancels `main`)
        # and when `main` ends: `main`'s loop and the listener's end on it even if
        # the cancellation meant for them was lost. Python 3.11's
        # `asyncio.wait_for`, which redis-py's sends use under a socket timeout,
        # drops one that meets the awaited call's end; the worker then never
        # stopped after SIGTERM.
        self._stopping = False
        self.on_stop = self._stop

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        if self._starved:
            # A slot is free: jobs that waited for one should start now.
            self._starved = False
            self._poll_due = True
            self._wake.set()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs`, with the claim of each job as one Lua call."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                self._starved = True
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            try:
                taken = await self._take_job(
                    keys=[
                        in_progress_key_prefix + job_id,
                        self.queue_name,
                        job_key_prefix + job_id,
                        retry_key_prefix + job_id,
                    ],
                    args=[
                        job_id,
                        timestamp_ms(),
                        int(self.in_progress_timeout_s * 1000),
                        RETRY_KEY_TTL_S,
                    ],
                )
            except BaseException:
                self.job_counter -= 1
                self.sem.release()
                raise
            if not taken:  # started elsewhere, finished, or deferred
                self.job_counter -= 1
                self.sem.release()
                continue
            score, job, tries = taken
            task = self.loop.create_task(
                self._run_taken(_TakenJob(job_id, job, int(tries)), int(float(score)))
            )
            task.add_done_callback(functools.partial(self._job_done, job_id))
            self.tasks[job_id] = task

    async def _run_taken(self, taken: _TakenJob, score: int) -> None:
        _taken.set(taken)  # this task's own context
        await self.run_job(taken.job_id, score)

    @property
    def pool(self) -> ArqRedis:
        """The store; for arq's first read of a job this worker took, what
        TAKE_JOB read of it (`_TakenJob`)."""
        taken = _taken.get()
        if taken is not None and not taken.read:
            return cast(ArqRedis, taken)
        return cast(ArqRedis, self._pool)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's `finish_job`, in one Lua call for a finished job, or one SET of
        its result for a job its turn's end forgot."""
        forgotten = job_id in self._jobs_forgotten
        self._jobs_forgotten.discard(job_id)
        keep_as_arq_does = result_data and (keep_result_forever or not result_timeout_s)
        if forgotten and finish and keep_in_progress is None and not keep_as_arq_does:
            if result_data:
                ttl_ms = int((result_timeout_s or 0) * 1000)
                await self.pool.set(result_key_prefix + job_id, result_data, px=ttl_ms)
            return
        if not finish or keep_in_progress is not None or keep_as_arq_does:
            await super().finish_job(
                job_id,
                finish,
                result_data,
                result_timeout_s,
                keep_result_forever,
                incr_score,
                keep_in_progress,
            )
            return
        args: list[str | bytes | int] = [job_id]
        if result_data:
            args += [result_data, int((result_timeout_s or 0) * 1000)]
        await self._forget_job(
            keys=[
                in_progress_key_prefix + job_id,
                retry_key_prefix + job_id,
                job_key_prefix + job_id,
                self.queue_name,
                result_key_prefix + job_id,
            ],
            args=args,
        )

    def job_forgotten(self, job_id: str) -> None:
        """The end of the job's turn forgot the job (its keys and queue entry):
        kept while the job runs, for `finish_job` to store only its result."""
        if job_id in self.tasks:
            self._jobs_forgotten.add(job_id)

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        # Forget the job at once, not at the next poll of the queue: arq's drain
        # on SIGTERM waits until no job is left in `tasks`.
        if self.tasks.get(job_id) is task:
            del self.tasks[job_id]
        self._jobs_forgotten.discard(job_id)
        if not task.cancelled() and task.exception() is not None:
            logger.error("job %s failed", job_id, exc_info=task.exception())
        self._release_sem_dec_counter_on_complete()

    def _stop(self, signum: Signals) -> None:
        self._stopping = True

    async def main(self) -> None:
        assert self._pool is not None, "FastPickupWorker needs redis_pool"
        await log_redis_info(self.pool, logger.info)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        listener = asyncio.create_task(self._listen())
        try:
            last_poll = 0.0
            while not self._stopping:
                self._wake.clear()
                # A busy worker, woken all the time, still polls as often as an
                # idle one: for signals it missed, and arq's own housekeeping.
                try:
                    if self._poll_due or time.monotonic() - last_poll > self.poll_delay_s:
                        self._poll_due = False
                        self._woken.clear()  # the poll finds them
                        last_poll = time.monotonic()
                        await self._poll_iteration()
                    elif self._woken:
                        woken = [job_id.encode() for job_id in self._woken]
                        self._woken.clear()
                        if self.allow_pick_jobs:  # False once stopping (arq's drain)
                            await self.start_jobs(woken)
                except (RedisError, OSError) as exc:
                    # The store is away or slow (every call has a timeout): the
                    # worker stays, and polls again once it answers.
                    logger.warning("worker could not poll the queue (%r)", exc)
                    self._poll_due = True
                    await asyncio.sleep(min(1.0, self.poll_delay_s))
                    continue
                try:
                    async with asyncio.timeout(self.poll_delay_s):
                        await self._wake.wait()
                except TimeoutError:
                    self._poll_due = True
        finally:
            self._stopping = True
            # Cancelled again until it ends: a cancellation can be lost (above),
            # and the listener otherwise ends at its next bounded wait.
            while not listener.done():
                listener.cancel()
                await asyncio.wait({listener}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        channels = [keys.CONTROL_CHANNEL]
        if self._fast_pickup:
            channels.append(keys.WAKE_CHANNEL)
        wake = keys.WAKE_CHANNEL.encode()
        while not self._stopping:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(*channels)
                # Anything enqueued while we were not listening is found now.
                self._poll_due = True
                self._wake.set()
                while not self._stopping:
                    # A bounded wait: the connection has a socket timeout, which
                    # an idle subscriber must not mistake for a lost store.
                    message = await pubsub.get_message(timeout=self.poll_delay_s)
                    if message is None or message["type"] != "message":
                        continue
                    if message["channel"] == wake:
                        self._woken.append(message["data"].decode())
                        self._wake.set()
                    else:
                        self._on_control(message["data"])
            except (RedisError, OSError) as exc:
                logger.warning("worker pub/sub connection lost (%s); reconnecting", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
