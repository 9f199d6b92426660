"""Commands sent to Redis are packed by hiredis (shared/queue.py): byte for byte
what redis-py would send, one buffer a command (a memoryview must be
C-contiguous; nothing sends a view)."""

from __future__ import annotations

import asyncio
import enum

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from shared.queue import connect


class _Priority(enum.IntEnum):
    HIGH = 1


class _Count(int):
    pass


class _Fraction(float):
    pass


COMMANDS: list[tuple[object, ...]] = [
    ("SET", "key", "value"),
    ("CLIENT SETINFO", "LIB-NAME", "redis-py"),  # a name of two words
    (b"CONFIG GET", b"maxmemory"),
    ("EVALSHA", "a" * 40, 2, b"k1", "k2", 1, 2.5, -3, b"", "", "\u00e9t\u00e9 \u2603"),
    ("XADD", b"log", "MAXLEN", "~", 10_000, "5-0", "t", "text_delta", "d", b"x" * 70_000),
    ("SET", memoryview(b"viewed key"), memoryview(b"viewed value")),
    ("SET", "floats", 1e20, 1e-07, 0.1 + 0.2, -0.0, float("inf"), 10**20),
    ("script load", "return 1"),  # a name of two words, lower case
    ("SET\tkey", "value"),  # split on any white space, as redis-py does
    ("", "PING"),  # an empty name: no word
    ("SET", "key", _Priority.HIGH, _Count(5), _Fraction(0.5)),  # subclasses of int and float
]


@pytest.mark.parametrize("command", COMMANDS)
def test_packed_as_redis_py_packs(redis_url: str, command: tuple[object, ...]) -> None:
    async def scenario() -> None:
        client = await connect(redis_url)
        try:
            ours = client.connection_pool.make_connection()
            assert type(ours).__name__ == "PackedConnection"
            packed = ours.pack_command(*command)  # type: ignore[arg-type]
            assert len(packed) == 1  # one buffer: one write
            theirs = Connection().pack_command(*command)  # type: ignore[arg-type]
            assert packed[0] == b"".join(bytes(part) for part in theirs)
        finally:
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("bad", [True, None, bytearray(b"x"), object(), ["a"]])
def test_arguments_redis_py_refuses_are_refused(redis_url: str, bad: object) -> None:
    """What redis-py's encoder refuses, the packer refuses with the same error type
    (nothing is half sent)."""

    async def scenario() -> None:
        client = await connect(redis_url)
        try:
            ours = client.connection_pool.make_connection()
            with pytest.raises(DataError):
                Connection().pack_command("SET", "key", bad)  # type: ignore[arg-type]
            with pytest.raises(DataError):
                ours.pack_command("SET", "key", bad)  # type: ignore[arg-type]
            with pytest.raises(DataError):
                await client.set("ss:test:packing:bad", bad)  # type: ignore[arg-type]
            assert await client.exists("ss:test:packing:bad") == 0
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_commands_and_pipelines_round_trip(redis_url: str) -> None:
    async def scenario() -> None:
        client = await connect(redis_url, socket_timeout=5)
        try:
            value = "\u00e9t\u00e9 " * 10_000
            await client.set("ss:test:packing", value)
            assert (await client.get("ss:test:packing")).decode() == value
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr("ss:test:packing:n")
                pipe.expire("ss:test:packing:n", 60)
                pipe.delete("ss:test:packing")
                assert await pipe.execute() == [1, True, 1]
            assert await client.execute_command("CLIENT INFO")
        finally:
            await client.delete("ss:test:packing:n")
            await client.aclose()

    asyncio.run(scenario())
