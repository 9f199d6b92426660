"""The turn queue: arq with a msgspec serializer, plus a wake-up signal.

arq workers find work by polling a sorted set every `poll_delay` (0.5 s by
default). sandstream publishes on `keys.WAKE_CHANNEL` right after each enqueue;
workers wait on that channel, so an idle worker starts a turn within
milliseconds and polls only as a slow fallback.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import expires_extra_ms, job_key_prefix, result_key_prefix
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


# What `ArqRedis.enqueue_job` does (job record with expiry, then the queue entry,
# unless the id exists), plus the running index and the wake-up signal, in one
# round trip instead of four.
# KEYS: job, result, queue, running. ARGV: job bytes, score ms, expiry ms, wake
# channel, job id, session id. -> 1 enqueued | 0 the job id exists already
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('PSETEX', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[6])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


class TurnQueue:
    def __init__(self, redis: ArqRedis) -> None:
        self._redis = redis
        self._enqueue = redis.register_script(_ENQUEUE)

    async def enqueue(self, job: TurnJob) -> bool:
        now_ms = int(time.time() * 1000)
        payload = serialize_job(
            TURN_FUNCTION,
            (msgspec.to_builtins(job),),
            {},
            None,
            now_ms,
            serializer=serialize_job_data,
        )
        added = await self._enqueue(
            keys=[
                job_key_prefix + job.turn_id,
                result_key_prefix + job.turn_id,
                keys.QUEUE,
                keys.RUNNING,
            ],
            args=[
                payload,
                now_ms,
                expires_extra_ms,
                keys.WAKE_CHANNEL,
                job.turn_id,
                job.session_id,
            ],
        )
        return bool(added)


async def queue_depth(redis: ArqRedis) -> int:
    return int(await redis.zcard(keys.QUEUE))
