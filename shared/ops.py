"""What operators read: the queue's content, live workers, recent turn outcomes.

Shared by the API's ops endpoints and `python -m worker check`.
"""

from __future__ import annotations

import socket
import time

import msgspec
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from shared import keys, metrics

_SCAN_LIMIT = 1000


class QueueReport(msgspec.Struct, kw_only=True):
    name: str
    queued: int
    deferred: int
    in_progress: int
    oldest_queued_seconds: float
    running_turns: int
    # Turns suspended until a person decides their tool calls (`shared.approvals`).
    awaiting_approval: int
    turns_last_hour: dict[str, int]
    turn_duration_ms: dict[str, int]


class WorkerReport(msgspec.Struct, kw_only=True):
    worker_id: str
    host: str
    pid: int
    running_turns: int
    started_at: str
    last_heartbeat: str
    seconds_since_heartbeat: float


async def queue_report(redis: Redis) -> QueueReport:
    return (await queue_and_figures(redis))[0]


async def queue_and_figures(redis: Redis) -> tuple[QueueReport, metrics.Folded]:
    """The queue's report, and the fleet's figures it was made from."""
    now_ms = time.time() * 1000
    entries = await redis.zrange(keys.QUEUE, 0, _SCAN_LIMIT - 1, withscores=True)
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _ in entries:
            pipe.exists(in_progress_key_prefix + job_id.decode())
        pipe.zcard(keys.QUEUE)
        pipe.scard(keys.RUNNING)
        pipe.zcard(keys.APPROVAL_DEADLINES)
        results = await pipe.execute()
    progress = results[: len(entries)]
    total, running, awaiting = results[len(entries) :]
    folded = await metrics.read_folded(redis, metrics.last_hour_buckets(time.time()))
    queued_scores = [
        score
        for (_, score), busy in zip(entries, progress, strict=True)
        if not busy and score <= now_ms
    ]
    deferred = sum(1 for _, score in entries if score > now_ms)
    in_progress = sum(1 for busy in progress if busy)
    # Past the scan limit, the rest counts as queued.
    queued = len(queued_scores) + max(0, int(total) - len(entries))
    oldest = (now_ms - min(queued_scores)) / 1000 if queued_scores else 0.0
    report = QueueReport(
        name=keys.QUEUE,
        queued=queued,
        deferred=deferred,
        in_progress=in_progress,
        oldest_queued_seconds=round(oldest, 3),
        running_turns=int(running),
        awaiting_approval=int(awaiting),
        turns_last_hour=folded.outcomes,
        turn_duration_ms=_percentiles(sorted(folded.durations)),
    )
    return report, folded


def _percentiles(ordered: list[int]) -> dict[str, int]:
    if not ordered:
        return {}

    def pick(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "count": len(ordered)}


async def worker_reports(redis: Redis, max_age: float) -> list[WorkerReport]:
    """Workers whose heartbeat is younger than `max_age` seconds."""
    now = time.time()
    seen_by_id = dict(
        await redis.zrangebyscore(keys.WORKERS, now - max_age, "+inf", withscores=True)
    )
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in seen_by_id:
            pipe.hgetall(keys.worker(worker_id.decode()))
        records = await pipe.execute()
    reports = []
    for record, seen in zip(records, seen_by_id.values(), strict=True):
        if not record:
            continue
        fields = {k.decode(): v.decode() for k, v in record.items()}
        reports.append(
            WorkerReport(
                worker_id=fields["worker_id"],
                host=fields["host"],
                pid=int(fields["pid"]),
                running_turns=int(fields["running_turns"]),
                started_at=fields["started_at"],
                last_heartbeat=fields["last_heartbeat"],
                seconds_since_heartbeat=round(now - float(seen), 3),
            )
        )
    return reports


async def local_worker_healthy(redis: Redis, max_age: float, pid: int | None) -> bool:
    """Whether a worker on this host (with this pid, if given) beats its heart."""
    host = socket.gethostname()
    return any(
        report.host == host and (pid is None or report.pid == pid)
        for report in await worker_reports(redis, max_age)
    )
