"""FileClient: talks to the file service running inside a sandbox (`fileservice`).

The service is one long-lived process per open sandbox, started on the first
request: a file tool then costs a round trip over a pipe, not a bubblewrap
start. What it answers is untrusted (the agent may have been running code as
the same uid), so each reply is size-limited and decoded into a typed struct.
A request that overruns its time, is cancelled (an interrupt) or gets a
malformed reply kills the service's whole process group; the next request
starts a fresh one.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from shared.sandbox.process import stop

HEADER = struct.Struct(">cI")
MAX_REPLY_BYTES = 16 << 20
# A walk in the service stops itself after this long; the client's own limit
# (the tool timeout) is the backstop.
LIST_SECONDS = 5.0
LIST_EXAMINED = 100_000

T = TypeVar("T", bound=msgspec.Struct)


class FileRefused(Exception):
    """The service refused or failed the request; the message is for the model (or
    the API's client); `code` says what kind of refusal it is, `entry` names the
    archive entry refused."""

    def __init__(self, message: str, code: str = "refused", entry: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.entry = entry


class FileServiceBroken(Exception):
    """The service died, answered out of protocol, or overran its time."""


class ReadReply(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    text: str
    omitted: int


class WriteReply(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    path: str
    size: int


class EditReply(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    path: str


class ListReply(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    entries: list[str]
    more: bool
    stopped: str | None


class ClearReply(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    left: int


class _Refusal(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    error: str
    code: str = "refused"
    entry: str | None = None


Spawn = Callable[[], Awaitable[asyncio.subprocess.Process]]


class FileClient:
    def __init__(self, spawn: Spawn, *, timeout: float) -> None:
        self._spawn = spawn
        self._timeout = timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def request(self, reply_type: type[T], op: str, **fields: Any) -> T:
        """One request; raises FileRefused with the service's reason, or
        FileServiceBroken when the service could not answer."""
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    payload = await self._exchange(msgspec.json.encode({"op": op, **fields}))
                return _decode(payload, reply_type)
            except FileRefused:
                raise
            except TimeoutError:
                await self._kill()
                raise FileServiceBroken(
                    f"the file operation took longer than {self._timeout:g} s and was stopped"
                ) from None
            except BaseException:  # broken, or cancelled (an interrupt): stop it for good
                await self._kill()
                raise

    async def _exchange(self, request: bytes) -> bytes:
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await self._spawn()
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(HEADER.pack(b"J", len(request)) + request)
            await proc.stdin.drain()
            kind, size = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))
            if kind != b"J" or size > MAX_REPLY_BYTES:
                raise FileServiceBroken("the sandbox's file service answered out of protocol")
            return await proc.stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise FileServiceBroken("the sandbox's file service stopped") from exc

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop(proc)

    async def close(self) -> None:
        async with self._lock:
            await self._kill()


def _decode(payload: bytes, reply_type: type[T]) -> T:
    try:
        raw = msgspec.json.decode(payload)
        if isinstance(raw, dict) and raw.get("ok") is False:
            refusal = msgspec.convert(raw, _Refusal)
            entry = refusal.entry[:1000] if refusal.entry is not None else None
            raise FileRefused(refusal.error[:2000], refusal.code[:64], entry)
        return msgspec.convert(raw, reply_type)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise FileServiceBroken("the sandbox's file service answered out of protocol") from None
