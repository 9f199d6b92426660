"""The turn queue: arq with a msgspec serializer, plus a wake-up signal.

arq workers find work by polling a sorted set every `poll_delay` (0.5 s by
default). The script that claims a session for a turn also queues the turn's
job and publishes on `keys.WAKE_CHANNEL`; workers wait on that channel, so an
idle worker starts a turn within milliseconds and polls only as a slow fallback.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job

from shared import keys

TURN_FUNCTION = "run_turn"


class TurnJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The arguments of a turn job, validated by the worker before it acts."""

    session_id: str
    turn_id: str


def serialize_job_data(data: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(data)


def deserialize_job_data(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.msgpack.decode(data, type=dict[str, Any])
    return decoded


async def connect(redis_url: str) -> ArqRedis:
    """A Redis client that is also an arq queue client (bytes replies)."""
    return await create_pool(
        RedisSettings.from_dsn(redis_url),
        job_serializer=serialize_job_data,
        job_deserializer=deserialize_job_data,
        default_queue_name=keys.QUEUE,
        retry=2,
    )


class QueuedJob(msgspec.Struct, frozen=True):
    """A turn's arq job, ready to be written by the claim (`SessionStore.claim_turn`)."""

    job: TurnJob
    payload: bytes
    score_ms: int

    def keys(self) -> list[str]:
        """The job's record, the queue and the running index."""
        return [job_key_prefix + self.job.turn_id, keys.QUEUE, keys.RUNNING]

    def args(self) -> list[str | bytes | int]:
        return [
            self.payload,
            self.score_ms,
            expires_extra_ms,
            keys.WAKE_CHANNEL,
            self.job.session_id,
        ]


def queued_job(job: TurnJob) -> QueuedJob:
    """The job as arq's `enqueue_job` writes it (its id is the turn's id), due now."""
    now_ms = int(time.time() * 1000)
    payload = serialize_job(
        TURN_FUNCTION,
        (msgspec.to_builtins(job),),
        {},
        None,
        now_ms,
        serializer=serialize_job_data,
    )
    return QueuedJob(job, payload, now_ms)


async def queue_depth(redis: ArqRedis) -> int:
    return int(await redis.zcard(keys.QUEUE))
