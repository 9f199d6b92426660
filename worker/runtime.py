"""The worker process: the arq job that runs turns, interrupts, and the reaper.

The reaper is what keeps a session from staying `running` forever: a turn whose
worker died stops renewing its lease, and any worker's reaper then ends it with
`session_failed{stop_reason: worker_lost}`. Turns are never retried, since their
tools may already have had side effects.

A lease is measured by the workers' own clocks, not by a TTL on Redis's: each
reaper remembers the lease epoch it saw for each started turn and since when,
and ends a turn only once that epoch stood still, across passes that all
reached the store, for lease + grace + a third of the lease. A pass that failed,
or came late (this process or the store stalled), forgets what it saw: a stall
or failover of the store, or a pause of this process, is never counted against
a turn. The turn's own worker fences itself a third of a lease before that
(`worker.turn`), so a lost turn's tools are dead before the session moves on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func

from shared import keys, scripts
from shared.approvals import ApprovalStore
from shared.heap import freeze_startup_heap
from shared.logs import bound
from shared.models import is_uuid, now_rfc3339
from shared.queue import (
    TURN_FUNCTION,
    TurnJob,
    connect,
    deserialize_job_data,
    serialize_job_data,
    warn_if_unauthenticated,
)
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import SandboxRefused
from shared.sandbox.network import forget_dead_namespaces
from shared.sandbox.pool import SandboxPool
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings
from shared.store import SessionStore
from shared.turns import (
    TurnState,
    decode_control,
    failed,
    new_turn_ids,
    until_stored,
    worth_retrying,
)
from worker.event_writer import EventWriter
from worker.pickup import FastPickupWorker
from worker.providers import ProviderFactory
from worker.providers.base import ProviderError
from worker.turn import TurnRunner

logger = logging.getLogger("sandstream.worker")

# arq's own timeout for a turn job, beyond the turn's: the turn ends itself first.
JOB_TIMEOUT_EXTRA = 60


def job_in_progress_ms(settings: Settings) -> int:
    """The TTL arq gives a job's in-progress key as a worker takes it: the job's
    timeout plus 10 s."""
    return int((settings.turn_timeout_seconds + JOB_TIMEOUT_EXTRA + 10) * 1000)


def _unstarted_job(state: TurnState | None) -> str | None:
    """The job of a turn that runs but that no worker has started; else None."""
    if state is None or state.state != "running" or state.turn_id is None or state.started:
        return None
    return state.job_id or state.turn_id


class _Seen(msgspec.Struct):
    """A started turn's lease as a reaper saw it: since when (monotonic) at this epoch.

    A turn that waited for approval starts again at epoch 1 with its
    continuation's job: the lease seen before it waited is another one."""

    turn_id: str
    job_id: str | None
    epoch: int
    since: float


# Sessions whose state a reaper's pass reads in one round trip.
_REAP_READS = 500


class _Sighting(NamedTuple):
    """When a reaper's read of a batch of leases took place, as the lease rule
    needs it: a lease seen for the first time is dated `first` (the reply), one
    seen again `again` (the request)."""

    first: float
    again: float


class WorkerRuntime:
    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.settings = settings
        self.store = SessionStore(
            redis,
            log_max_events=settings.log_max_events,
            log_ttl_seconds=settings.log_ttl_seconds,
            sandbox_uid_base=settings.sandbox_uid_base,
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.approvals = ApprovalStore(
            redis,
            log_max_events=settings.log_max_events,
            log_ttl_seconds=settings.log_ttl_seconds,
        )
        self._beat = scripts.register(redis, scripts.WORKER_HEARTBEAT)
        # Told of each job whose turn's end forgot it (`SessionStore.finish_turn`):
        # arq stores only its result as it returns (`FastPickupWorker.job_forgotten`).
        self.on_job_forgotten: Callable[[str], None] = lambda job_id: None
        self.running: dict[str, TurnRunner] = {}
        self.events = EventWriter(
            self.store,
            text_window=settings.text_delta_window_ms / 1000,
            max_gather=settings.event_gather_max_ms / 1000,
        )
        self.providers = ProviderFactory(settings)
        self.confinement = Confinement.detect(settings, "worker")
        # The reaper's memory of leases, and when its last pass that reached
        # the store ended.
        self._seen: dict[str, _Seen] = {}
        self._last_pass: float | None = None
        self._sandboxes: dict[str, SandboxSpec] = {}
        # A sandbox's file service, cgroup and network outlive a turn that ended
        # cleanly, for the sandbox's next turn on this worker.
        self.pool = SandboxPool(
            self.confinement,
            file_timeout=settings.tool_timeout_seconds,
            idle_seconds=settings.sandbox_idle_seconds,
            idle_per_sandbox=2,
            max_idle=settings.sandbox_idle_max,
        )
        # Workspace preparation has threads of its own: nothing a tool does can
        # take them (tools run in the sandbox, not in this process's threads).
        self._disk = ThreadPoolExecutor(2, thread_name_prefix="workspace")

    async def run_turn(
        self, job: TurnJob, accepted_at: float | None = None, job_id: str = ""
    ) -> bool:
        """Run the job's turn; False when it is not the session's current turn
        (finished, reaped or interrupted already: a redelivered job does nothing).
        `accepted_at`: when the API queued it (epoch seconds), for the metrics;
        `job_id`: the arq job's, forgotten by the turn's end (`on_job_forgotten`)."""
        leased_at = time.monotonic()
        # Past the fence deadline no reaper could have ended the turn yet; after
        # it the turn may be someone else's: the start and the sandbox are asked
        # for again while the store cannot take them (a lost reply included: the
        # turn is then handed back) until then.
        fence_at = leased_at + self.settings.fence_after_seconds()
        started = await until_stored(
            lambda: self.store.start_turn(job.session_id, job.turn_id, self.worker_id),
            what=f"the start of turn {job.turn_id}",
            give_up=lambda: time.monotonic() > fence_at,
            logger=logger,
        )
        if started is None:
            logger.info("job for turn %s: turn not current; skipped", job.turn_id)
            return False
        agent = started.agent or self.settings.default_agent()
        # A turn that waited for approval: where it stopped, and the decisions.
        resumed = (
            await self.approvals.take_suspended(job.session_id, job.turn_id)
            if job.resumes  # a turn's first job has no record to look for
            else None
        )
        if resumed is not None:
            await self.approvals.forget(job.session_id)
        try:
            provider = await self.providers.get(agent)
            spec = await until_stored(
                lambda: self._sandbox(started.sandbox_id),
                what=f"the sandbox of turn {job.turn_id}",
                give_up=lambda: time.monotonic() > fence_at,
                logger=logger,
            )
        except (ProviderError, SandboxRefused) as exc:
            code, text = (
                (exc.code, exc.message)
                if isinstance(exc, ProviderError)
                else ("sandbox_unavailable", str(exc))
            )
            ids = new_turn_ids(job.session_id, started.sandbox_id, job.turn_id)
            terminal = failed(ids, "error", code, text)
            # Asked again like the start: a second finish whose first landed
            # finds the turn no longer current and changes nothing.
            ended = await until_stored(
                lambda: self.store.finish_turn(
                    job.session_id,
                    job.turn_id,
                    "worker",
                    None,
                    terminal,
                    worker_id=self.worker_id,
                    job_id=job_id,
                ),
                what=f"the end of turn {job.turn_id}",
                give_up=lambda: time.monotonic() > fence_at,
                logger=logger,
            )
            if ended and job_id:
                self.on_job_forgotten(job_id)
            return True
        sandbox = self.pool.take(spec)
        runner = TurnRunner(
            store=self.store,
            approvals=self.approvals,
            writer=self.events,
            settings=self.settings,
            provider=provider,
            agent=agent,
            sandbox=sandbox,
            worker_id=self.worker_id,
            session_id=job.session_id,
            sandbox_id=started.sandbox_id,
            turn_id=job.turn_id,
            history=started.history,
            accepted_at=accepted_at,
            resumed=resumed,
            job_id=job_id,
        )
        self.running[job.session_id] = runner
        try:
            await runner.run(leased_at)
        finally:
            if self.running.get(job.session_id) is runner:
                del self.running[job.session_id]
            if runner.job_forgotten:
                self.on_job_forgotten(job_id)
            await self.pool.give_back(sandbox)
        return True

    async def _sandbox(self, sandbox_id: str) -> SandboxSpec:
        """The sandbox's workspace, made ready (owned by its uid, under its quota),
        its uid and whether it may reach the network: once per worker, since none
        of it changes."""
        spec = self._sandboxes.get(sandbox_id)
        if spec is None:
            record = await self.store.get_sandbox_record(sandbox_id)
            if record is None:
                raise SandboxRefused("the session's sandbox no longer exists")
            try:
                workspace = await asyncio.get_running_loop().run_in_executor(
                    self._disk,
                    prepare_workspace,
                    self.settings.sandbox_root,
                    sandbox_id,
                    record.uid,
                    self.confinement.quota,
                )
            except OSError as exc:
                logger.exception("preparing the workspace of sandbox %s failed", sandbox_id)
                raise SandboxRefused(
                    f"the sandbox's workspace could not be prepared ({exc.strerror})"
                ) from None
            spec = SandboxSpec(
                sandbox_id=sandbox_id, workspace=workspace, uid=record.uid, network=record.network
            )
            self._sandboxes[sandbox_id] = spec
        return spec

    def on_control(self, data: bytes) -> None:
        try:
            msg = decode_control(data)
        except msgspec.DecodeError:
            logger.warning("ignored a malformed control message")
            return
        runner = self.running.get(msg.session_id)
        if runner is not None and runner.turn_id == msg.turn_id:
            runner.interrupt()

    async def heartbeat_forever(self) -> None:
        """This worker's own heartbeat key, for ops and for `python -m worker check`."""
        started_at = now_rfc3339()
        interval = self.settings.worker_heartbeat_seconds
        while True:
            try:
                now = time.time()
                record = {
                    "worker_id": self.worker_id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "running_turns": len(self.running),
                    "started_at": started_at,
                    "last_heartbeat": now_rfc3339(),
                }
                fields = [str(item) for pair in record.items() for item in pair]
                await self._beat(
                    keys=[keys.worker(self.worker_id), keys.WORKERS],
                    args=[int(interval * 3) + 1, now, now - 3600, self.worker_id, *fields],
                )
            except Exception as exc:
                if worth_retrying(exc):
                    logger.warning("worker heartbeat failed: %r", exc)
                else:
                    logger.exception("worker heartbeat failed")
            await asyncio.sleep(interval)

    async def forget_worker(self) -> None:
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker(self.worker_id))
            pipe.zrem(keys.WORKERS, self.worker_id)
            await pipe.execute()

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_seconds)
            try:
                await self.reap_once()
            except Exception as exc:
                # What was seen before a pass that failed proves nothing after it.
                self._seen.clear()
                if worth_retrying(exc):
                    logger.warning("reaper pass failed: %r", exc)
                else:
                    logger.exception("reaper pass failed")

    async def reap_once(self) -> int:
        """End turns whose worker is gone or that no worker picked up in time,
        and deny (as timed out) the tool calls whose approval is overdue."""
        settings = self.settings
        began = time.monotonic()
        late = 2 * settings.reaper_interval_seconds + settings.worker_socket_timeout()
        if self._last_pass is None or began - self._last_pass > late:
            self._seen.clear()  # this process or the store stalled since the last pass
        reaped = await self.approvals.expire_overdue()
        now_ms = time.time() * 1000
        running = await self.store.running_sessions()
        for sid in set(self._seen) - set(running):
            del self._seen[sid]
        for first in range(0, len(running), _REAP_READS):
            batch = running[first : first + _REAP_READS]
            # A lease seen first is dated by the reply (the latest it can have
            # been read), one seen again by the request (the earliest): the
            # standstill counted is never longer than the real one, however
            # long a batch's read takes.
            asked_at = time.monotonic()
            states = await self.store.turn_states(batch)
            seen = _Sighting(first=time.monotonic(), again=asked_at)
            taken = await self._in_progress_ttls(batch, states)
            for sid, state in zip(batch, states, strict=True):
                reaped += await self._reap(sid, state, seen, now_ms, taken)
        self._last_pass = time.monotonic()
        return reaped

    async def _reap(
        self,
        sid: str,
        state: TurnState | None,
        seen: _Sighting,
        now_ms: float,
        taken: dict[str, int],
    ) -> int:
        """One running session, as a reaper's pass read it (`taken`: by session,
        the TTL left of arq's in-progress key of a turn not started): 1 if ended."""
        settings = self.settings
        if state is None or state.state != "running" or state.turn_id is None:
            await self.store.forget_running(sid)
            return 0
        if state.started:
            before = self._seen.get(sid)
            lease = (state.turn_id, state.job_id, state.lease_epoch)
            if before is None or (before.turn_id, before.job_id, before.epoch) != lease:
                self._seen[sid] = _Seen(*lease, seen.first)
                return 0
            if seen.again - before.since < settings.lost_after_seconds():
                return 0
            del self._seen[sid]
            done = await self.store.end_orphaned(
                sid, state.sandbox_id, state.turn_id, state.lease_epoch
            )
        elif self._picked_up_long_ago(taken.get(sid, -2)):
            # A worker took the job but never started the turn: it died in
            # between. arq would hand the job out again only after an hour.
            done = await self.store.end_unstarted(sid, state.sandbox_id, state.turn_id, "lost")
        elif now_ms - state.claimed_ms > settings.queued_turn_timeout_seconds * 1000:
            done = await self.store.end_unstarted(
                sid, state.sandbox_id, state.turn_id, "queue_timeout"
            )
        else:
            return 0
        if done:
            logger.warning("turn %s of session %s ended by the reaper", state.turn_id, sid)
        return int(done)

    async def _in_progress_ttls(
        self, sids: list[str], states: list[TurnState | None]
    ) -> dict[str, int]:
        """What is left of arq's in-progress key (PTTL, ms) of each turn read that
        runs but has not started, by session: all in one round trip."""
        jobs = {
            sid: job
            for sid, job in zip(sids, map(_unstarted_job, states), strict=True)
            if job is not None
        }
        if not jobs:
            return {}
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for job_id in jobs.values():
                pipe.pttl(in_progress_key_prefix + job_id)
            ttls = await pipe.execute()
        return {sid: int(ttl) for sid, ttl in zip(jobs, ttls, strict=True)}

    def _picked_up_long_ago(self, ttl_ms: int) -> bool:
        """Whether arq marked the turn's job in progress longer ago than a lease may
        stand still.

        arq sets its in-progress key with a TTL of the job timeout plus 10 s when
        a worker takes the job; what is left of that TTL (`ttl_ms`, negative when
        there is no such key) says how long ago."""
        if ttl_ms < 0:
            return False
        taken_ms_ago = job_in_progress_ms(self.settings) - ttl_ms
        return taken_ms_ago > self.settings.lost_after_seconds() * 1000


async def run_turn(ctx: dict[str, Any], payload: Any) -> str:
    """The arq job. Its argument is validated before anything acts on it."""
    try:
        job = msgspec.convert(payload, TurnJob)
    except msgspec.ValidationError as exc:
        logger.error("rejected turn job %s: %s", ctx.get("job_id"), exc)
        return "rejected"
    if not (is_uuid(job.session_id) and is_uuid(job.turn_id)):
        logger.error("rejected turn job %s: ids are not UUIDs", ctx.get("job_id"))
        return "rejected"
    runtime: WorkerRuntime = ctx["runtime"]
    with bound(job_id=ctx.get("job_id"), session_id=job.session_id, turn_id=job.turn_id):
        enqueued = ctx.get("enqueue_time")
        accepted_at = enqueued.timestamp() if isinstance(enqueued, datetime) else None
        job_id = ctx.get("job_id")
        ran = await runtime.run_turn(job, accepted_at, job_id if isinstance(job_id, str) else "")
        logger.info("turn %s", "done" if ran else "skipped: not current")
    return "done" if ran else "skipped"


async def build_worker(settings: Settings) -> tuple[FastPickupWorker, WorkerRuntime]:
    redis = await connect(
        settings.redis_url,
        settings.redis_password,
        settings.redis_tls_ca_file,
        socket_timeout=settings.worker_socket_timeout(),
    )
    runtime = WorkerRuntime(redis, settings)
    reaper: list[asyncio.Task[None]] = []

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["runtime"] = runtime
        warn_if_unauthenticated(settings.redis_url, settings.redis_password, logger)
        await runtime.providers.warm()
        await scripts.load_registered(redis)
        freeze_startup_heap()
        reaper.append(asyncio.create_task(runtime.reap_forever()))
        reaper.append(asyncio.create_task(runtime.heartbeat_forever()))
        logger.info(
            "worker %s ready (provider %s, fast pickup %s)",
            runtime.worker_id,
            settings.provider,
            "on" if settings.worker_fast_pickup else "off",
        )
        for ok, line in runtime.confinement.describe():
            logger.log(logging.INFO if ok else logging.WARNING, "sandbox isolation: %s", line)
        if runtime.confinement.networks is not None:
            await forget_dead_namespaces()

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        for task in reaper:
            task.cancel()
        await runtime.events.close()  # the turns are over: arq awaited them
        await runtime.forget_worker()
        await runtime.pool.close()
        if runtime.confinement.cgroups is not None:
            runtime.confinement.cgroups.close()

    worker = FastPickupWorker(
        functions=[
            func(
                run_turn,
                name=TURN_FUNCTION,
                max_tries=1,
                timeout=settings.turn_timeout_seconds + JOB_TIMEOUT_EXTRA,
            )
        ],
        redis_pool=redis,
        queue_name=keys.QUEUE,
        job_serializer=serialize_job_data,
        job_deserializer=deserialize_job_data,
        max_jobs=settings.worker_max_jobs,
        keep_result=60,
        poll_delay=settings.worker_fallback_poll_seconds if settings.worker_fast_pickup else 0.5,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        handle_signals=True,
        # On SIGTERM: take no new turns, let running ones finish for this long,
        # then end the rest as interrupted.
        job_completion_wait=settings.worker_drain_seconds,
        # A cancelled turn is ended, never queued again: tools have side effects.
        retry_jobs=False,
        on_control=runtime.on_control,
        fast_pickup=settings.worker_fast_pickup,
    )
    runtime.on_job_forgotten = worker.job_forgotten
    return worker, runtime
