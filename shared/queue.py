"""The turn queue: arq with a msgspec serializer, plus a wake-up signal.

arq workers find work by polling a sorted set every `poll_delay` (0.5 s by
default). sandstream publishes on `keys.WAKE_CHANNEL` right after each enqueue;
workers wait on that channel, so an idle worker starts a turn within
milliseconds and polls only as a slow fallback.
"""

from __future__ import annotations

from typing import Any

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool

from shared import keys

TURN_FUNCTION = "run_turn"


class TurnJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The arguments of a turn job, validated by the worker before it acts."""

    session_id: str
    turn_id: str


def serialize_job(data: dict[str, Any]) -> bytes:
    return msgspec.msgpack.encode(data)


def deserialize_job(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.msgpack.decode(data, type=dict[str, Any])
    return decoded


async def connect(redis_url: str) -> ArqRedis:
    """A Redis client that is also an arq queue client (bytes replies)."""
    return await create_pool(
        RedisSettings.from_dsn(redis_url),
        job_serializer=serialize_job,
        job_deserializer=deserialize_job,
        default_queue_name=keys.QUEUE,
        retry=2,
    )


async def enqueue_turn(redis: ArqRedis, job: TurnJob) -> None:
    await redis.enqueue_job(
        TURN_FUNCTION,
        msgspec.to_builtins(job),
        _job_id=job.turn_id,
        _queue_name=keys.QUEUE,
    )
    await redis.publish(keys.WAKE_CHANNEL, job.turn_id)


async def queue_depth(redis: ArqRedis) -> int:
    return int(await redis.zcard(keys.QUEUE))
