"""The worker process: the arq job that runs turns, interrupts, and the reaper.

The reaper is what keeps a session from staying `running` forever: a turn whose
worker died stops renewing its lease, and any worker's reaper then ends it with
`session_failed{stop_reason: worker_lost}`. Turns are never retried, since their
tools may already have had side effects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Literal

import msgspec
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import func

from shared import events as ev
from shared import keys
from shared.logs import bound
from shared.models import is_uuid, new_id, now_rfc3339
from shared.queue import (
    TURN_FUNCTION,
    TurnJob,
    connect,
    deserialize_job_data,
    serialize_job_data,
    warn_if_unauthenticated,
)
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox, SandboxRefused
from shared.sandbox.network import forget_dead_namespaces
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings
from shared.store import FinishMode, SessionStore
from worker.event_writer import EventWriter
from worker.pickup import FastPickupWorker
from worker.providers import ProviderFactory
from worker.providers.base import ProviderError
from worker.turn import TurnRunner

logger = logging.getLogger("sandstream.worker")

# arq's own timeout for a turn job, beyond the turn's: the turn ends itself first.
JOB_TIMEOUT_EXTRA = 60


class ControlMessage(msgspec.Struct, frozen=True):
    session_id: str
    turn_id: str


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
        self.running: dict[str, TurnRunner] = {}
        self.events = EventWriter(self.store, text_window=settings.text_delta_window_ms / 1000)
        self.providers = ProviderFactory(settings)
        self.confinement = Confinement.detect(settings, "worker")
        self._control_decoder = msgspec.json.Decoder(ControlMessage)
        self._sandboxes: dict[str, SandboxSpec] = {}
        # Workspace preparation has threads of its own: nothing a tool does can
        # take them (tools run in the sandbox, not in this process's threads).
        self._disk = ThreadPoolExecutor(2, thread_name_prefix="workspace")

    async def run_turn(self, job: TurnJob, accepted_at: float | None = None) -> bool:
        """Run the job's turn; False when it is not the session's current turn
        (finished, reaped or interrupted already: a redelivered job does nothing).
        `accepted_at`: when the API queued it (epoch seconds), for the metrics."""
        lease_ms = int(self.settings.lease_seconds * 1000)
        started = await self.store.start_turn(job.session_id, job.turn_id, self.worker_id, lease_ms)
        if started is None:
            logger.info("job for turn %s: turn not current; skipped", job.turn_id)
            return False
        agent = started.agent or self.settings.default_agent()
        try:
            provider = await self.providers.get(agent)
            spec = await self._sandbox(started.sandbox_id)
        except (ProviderError, SandboxRefused) as exc:
            error = (
                ev.ErrorInfo(code=exc.code, message=exc.message)
                if isinstance(exc, ProviderError)
                else ev.ErrorInfo(code="sandbox_unavailable", message=str(exc))
            )
            await self._end(
                job.session_id, started.sandbox_id, job.turn_id, "worker", "error", error
            )
            return True
        sandbox = OpenSandbox(
            self.confinement, spec, file_timeout=self.settings.tool_timeout_seconds
        )
        runner = TurnRunner(
            store=self.store,
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
        )
        self.running[job.session_id] = runner
        try:
            await runner.run(lease_ms)
        finally:
            if self.running.get(job.session_id) is runner:
                del self.running[job.session_id]
            await sandbox.close()
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
            msg = self._control_decoder.decode(data)
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
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(keys.worker(self.worker_id), mapping=record)
                    pipe.expire(keys.worker(self.worker_id), int(interval * 3) + 1)
                    pipe.zadd(keys.WORKERS, {self.worker_id: now})
                    pipe.zremrangebyscore(keys.WORKERS, 0, now - 3600)
                    await pipe.execute()
            except Exception:
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
            except Exception:
                logger.exception("reaper pass failed")

    async def reap_once(self) -> int:
        """End turns whose worker is gone or that no worker picked up in time."""
        reaped = 0
        now_ms = time.time() * 1000
        for sid in await self.store.running_sessions():
            state = await self.store.turn_state(sid)
            if state is None or state.state != "running" or state.turn_id is None:
                await self.store.forget_running(sid)
                continue
            lost = ev.ErrorInfo(
                code="worker_lost", message="the worker running this turn stopped responding"
            )
            if state.started:
                if await self.store.redis.exists(keys.lease(sid)):
                    continue
                done = await self._end(
                    sid, state.sandbox_id, state.turn_id, "orphaned", "worker_lost", lost
                )
            elif await self._picked_up_long_ago(state.turn_id):
                # A worker took the job but never started the turn: it died in
                # between. arq would hand the job out again only after an hour.
                done = await self._end(
                    sid, state.sandbox_id, state.turn_id, "unstarted", "worker_lost", lost
                )
            elif now_ms - state.claimed_ms > self.settings.queued_turn_timeout_seconds * 1000:
                late = ev.ErrorInfo(
                    code="queue_timeout", message="no worker picked this turn up in time"
                )
                done = await self._end(
                    sid, state.sandbox_id, state.turn_id, "unstarted", "timeout", late
                )
            else:
                continue
            reaped += int(done)
        return reaped

    async def _picked_up_long_ago(self, turn_id: str) -> bool:
        """Whether arq marked the turn's job in progress more than a lease ago.

        arq sets its in-progress key with a TTL of the job timeout plus 10 s when
        a worker takes the job; what is left of that TTL says how long ago."""
        ttl_ms = int(await self.store.redis.pttl(in_progress_key_prefix + turn_id))
        if ttl_ms < 0:
            return False
        in_progress_ms = (self.settings.turn_timeout_seconds + JOB_TIMEOUT_EXTRA + 10) * 1000
        return in_progress_ms - ttl_ms > self.settings.lease_seconds * 1000

    async def _end(
        self,
        sid: str,
        sandbox_id: str,
        turn_id: str,
        mode: FinishMode,
        stop: Literal["error", "timeout", "worker_lost"],
        error: ev.ErrorInfo,
    ) -> bool:
        terminal = ev.SessionFailed(
            session_id=sid,
            sandbox_id=sandbox_id,
            turn_id=turn_id,
            message_id=new_id(),
            created_at=now_rfc3339(),
            error=error,
            stop_reason=stop,
        )
        seq = await self.store.finish_turn(sid, turn_id, mode, None, terminal)
        if seq:
            logger.warning("turn %s of session %s ended: %s", turn_id, sid, error.message)
        return bool(seq)


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
        ran = await runtime.run_turn(job, accepted_at)
        logger.info("turn %s", "done" if ran else "skipped: not current")
    return "done" if ran else "skipped"


async def build_worker(settings: Settings) -> tuple[FastPickupWorker, WorkerRuntime]:
    redis = await connect(settings.redis_url, settings.redis_password, settings.redis_tls_ca_file)
    runtime = WorkerRuntime(redis, settings)
    reaper: list[asyncio.Task[None]] = []

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["runtime"] = runtime
        warn_if_unauthenticated(settings.redis_url, settings.redis_password, logger)
        await runtime.providers.warm()
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
    return worker, runtime
