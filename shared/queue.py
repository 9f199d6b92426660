"""The turn queue: arq with a msgspec serializer, plus a wake-up signal.

arq workers find work by polling a sorted set every `poll_delay` (0.5 s by
default). The script that claims a session for a turn also queues the turn's
job and publishes on `keys.WAKE_CHANNEL`; workers wait on that channel, so an
idle worker starts a turn within milliseconds and polls only as a slow fallback.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import hiredis
import msgspec
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import (
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from arq.jobs import serialize_job
from redis.asyncio.connection import AbstractConnection
from redis.typing import EncodableT

from shared import keys

if TYPE_CHECKING:
    from redis._parsers.encoders import Encoder

TURN_FUNCTION = "run_turn"


class TurnJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The arguments of a turn job, validated by the worker before it acts."""

    session_id: str
    turn_id: str
    # A continuation of a turn that waited for approval (`shared.approvals`):
    # its worker picks up where the turn stopped.
    resumes: bool = False


def _encode_unknown(value: Any) -> Any:
    """A job that raised has its exception as its result: stored as its text
    (arq would otherwise fail to store the result at all)."""
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_job_encoder = msgspec.msgpack.Encoder(enc_hook=_encode_unknown)


def serialize_job_data(data: dict[str, Any]) -> bytes:
    return _job_encoder.encode(data)


def deserialize_job_data(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.msgpack.decode(data, type=dict[str, Any])
    return decoded


def redis_settings(url: str, password: str = "", tls_ca_file: str = "") -> RedisSettings:
    """Connection settings from `redis://[user:password@]host:port/db` (`rediss://`
    for TLS, `unix://` for a socket). The password may also come on its own
    (from a secret store), and a CA file verifies a TLS server's certificate."""
    settings = RedisSettings.from_dsn(url)
    parsed = urlsplit(url)
    # arq hands on the URL's user and password still percent-encoded.
    settings.username = unquote(parsed.username) if parsed.username else None
    settings.password = unquote(parsed.password) if parsed.password else (password or None)
    if settings.ssl and tls_ca_file:
        settings.ssl_ca_certs = tls_ca_file
    return settings


def warn_if_unauthenticated(url: str, password: str, logger: logging.Logger) -> None:
    """Say so loudly when Redis is used without a password: anything that can
    reach it could read and change every session."""
    parts = urlsplit(url)
    if parts.password or password or parts.scheme == "unix":
        return
    logger.warning(
        "Redis at %s:%s is used WITHOUT a password; set one (in SANDSTREAM_REDIS_URL or "
        "SANDSTREAM_REDIS_PASSWORD) anywhere but a development machine",
        parts.hostname,
        parts.port or 6379,
    )


async def connect(
    redis_url: str,
    password: str = "",
    tls_ca_file: str = "",
    *,
    socket_timeout: float | None = None,
) -> ArqRedis:
    """A Redis client that is also an arq queue client (bytes replies).

    With `socket_timeout`, every call on it (arq's own included) gives up after
    that long instead of waiting for a reply that a partition would never bring.
    """
    pool = await create_pool(
        redis_settings(redis_url, password, tls_ca_file),
        job_serializer=serialize_job_data,
        job_deserializer=deserialize_job_data,
        default_queue_name=keys.QUEUE,
        retry=2,
    )
    # arq's settings have neither a socket timeout nor a connection class: both
    # are set on the pool, which lets go of the connection its first ping made.
    connections = pool.connection_pool
    if socket_timeout is not None:
        connections.connection_kwargs["socket_timeout"] = socket_timeout
    connections.connection_class = _packed(connections.connection_class)
    await connections.disconnect()
    connections.reset()  # type: ignore[no-untyped-call]
    return pool


class _HiredisPacking:
    """Commands packed by hiredis (C) into one buffer, from their arguments as
    they are. redis-py's asyncio connections pack in Python, an argument at a
    time; its hiredis packer runs its per-argument encoder first, which cost
    about as much again as the packing. hiredis takes str (as UTF-8), bytes,
    memoryview, int and float (written as `repr` writes it) as they are, which
    is what the encoder makes of them too; what it does not take (an int
    subclass such as an IntEnum, and what the encoder refuses: bool, None,
    bytearray...) goes through the encoder, as redis-py would send it or with
    redis-py's DataError. For the worker's append call, 1.4 to 2.2 µs an event
    against 9.6 to 10.3 packed by redis-py's connection (bench 6b), and 5.6
    with the encoder first. A memoryview must be C-contiguous (hiredis sends
    the bytes from its start); nothing here sends a view to Redis."""

    encoder: Encoder

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        # A command name of several words ("SCRIPT LOAD") is split as redis-py splits it.
        head = args[0]
        if isinstance(head, str):
            words: tuple[EncodableT, ...] = tuple(head.encode().split())
        elif isinstance(head, bytes) and b" " in head:
            words = tuple(head.split())
        else:
            words = (head,)
        command = words + args[1:]
        try:
            # (hiredis's stub gives the tuple one item)
            return [hiredis.pack_command(command)]  # type: ignore[arg-type]
        except TypeError:
            return [hiredis.pack_command(tuple(map(self.encoder.encode, command)))]


def _packed(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS or Unix socket) packing with hiredis."""
    if issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"Packed{connection_class.__name__}", (_HiredisPacking, connection_class), {})


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


def finished_job_keys(job_id: str) -> list[str]:
    """What a turn's job keeps in the store until it is forgotten, but for its
    result: its in-progress mark, its try count, its record, and the queue that
    may still hold its entry."""
    return [
        in_progress_key_prefix + job_id,
        retry_key_prefix + job_id,
        job_key_prefix + job_id,
        keys.QUEUE,
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
