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
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from shared.sandbox.process import stop

HEADER = struct.Struct(">cI")
MAX_REPLY_BYTES = 16 << 20
MAX_DATA_BYTES = 4 << 20
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

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def request(self, reply_type: type[T], op: str, **fields: Any) -> T:
        """One request; raises FileRefused with the service's reason, or
        FileServiceBroken when the service could not answer."""
        try:
            async with asyncio.timeout(self._timeout), self.channel() as channel:
                await channel.send_request(op, **fields)
                return await channel.reply(reply_type)
        except TimeoutError:
            raise FileServiceBroken(
                f"the file operation took longer than {self._timeout:g} s and was stopped"
            ) from None

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[Channel]:
        """The service to oneself for a conversation of several frames (see
        `shared.sandbox.transfers`). Left in the middle of one (an error, a
        cancellation, an interrupt), the service is stopped for good; the next
        request starts a fresh one."""
        async with self._lock:
            if not self.alive:
                self._proc = await self._spawn()
            assert self._proc is not None
            channel = Channel(self._proc, self._timeout)
            try:
                yield channel
            except BaseException:
                if not channel.settled:
                    await self._kill()
                raise
            if not channel.settled:
                await self._kill()

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop(proc)

    async def close(self) -> None:
        async with self._lock:
            await self._kill()


class Channel:
    """One conversation with the service. `settled` is true between requests:
    when the last request's conversation ended as the protocol says it ends."""

    def __init__(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self.timeout = timeout
        self.settled = True

    async def _send(self, kind: bytes, payload: bytes | memoryview = b"") -> None:
        try:
            self._stdin.write(HEADER.pack(kind, len(payload)))
            if payload:
                self._stdin.write(payload)
            async with asyncio.timeout(self.timeout):
                await self._stdin.drain()
        except ConnectionError as exc:
            raise FileServiceBroken("the sandbox's file service stopped") from exc
        except TimeoutError:
            raise FileServiceBroken(
                f"the sandbox's file service took no data for {self.timeout:g} s"
            ) from None

    async def send_request(self, op: str, **fields: Any) -> None:
        self.settled = False
        await self._send(b"J", msgspec.json.encode({"op": op, **fields}))

    async def send_follow_up(self, **fields: Any) -> None:
        """A further request within the same operation."""
        await self._send(b"J", msgspec.json.encode(fields))

    async def send_data(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), MAX_DATA_BYTES):
            await self._send(b"D", view[start : start + MAX_DATA_BYTES])

    async def send_end(self) -> None:
        await self._send(b"E")

    async def send_abort(self) -> None:
        await self._send(b"A")

    async def frame(self, timeout: float | None = -1.0) -> tuple[bytes, bytes]:
        """The next frame; `timeout`: how long to wait for it (the channel's by
        default, None for as long as it takes)."""
        wait = self.timeout if timeout is not None and timeout < 0 else timeout
        try:
            async with asyncio.timeout(wait):
                kind, size = HEADER.unpack(await self._stdout.readexactly(HEADER.size))
                if kind not in (b"J", b"D", b"E") or size > (
                    MAX_REPLY_BYTES if kind == b"J" else MAX_DATA_BYTES
                ):
                    raise FileServiceBroken("the sandbox's file service answered out of protocol")
                return kind, await self._stdout.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise FileServiceBroken("the sandbox's file service stopped") from exc
        except TimeoutError:
            raise FileServiceBroken(
                f"the sandbox's file service did not answer for {wait:g} s"
            ) from None

    async def reply(
        self, reply_type: type[T], *, final: bool = True, timeout: float | None = -1.0
    ) -> T:
        """The reply to the request; FileRefused when it is a refusal (which
        ends the conversation). `final`: whether a success ends it too."""
        kind, payload = await self.frame(timeout)
        if kind != b"J":
            raise FileServiceBroken("the sandbox's file service answered out of protocol")
        try:
            reply = decode_reply(payload, reply_type)
        except FileRefused:
            self.settled = True
            raise
        self.settled = final
        return reply

    async def data(self) -> AsyncIterator[bytes]:
        """Data frames up to their end; a refusal in place of the end raises."""
        while True:
            kind, payload = await self.frame()
            if kind == b"D":
                yield payload
            elif kind == b"E":
                self.settled = True
                return
            else:
                try:
                    decode_reply(payload, _Refusal)
                except FileRefused:
                    self.settled = True
                    raise
                raise FileServiceBroken("the sandbox's file service answered out of protocol")


def decode_reply(payload: bytes, reply_type: type[T]) -> T:
    """A reply as `reply_type`; FileRefused when it is a refusal."""
    try:
        raw = msgspec.json.decode(payload)
        if isinstance(raw, dict) and raw.get("ok") is False:
            refusal = msgspec.convert(raw, _Refusal)
            entry = refusal.entry[:1000] if refusal.entry is not None else None
            raise FileRefused(refusal.error[:2000], refusal.code[:64], entry)
        return msgspec.convert(raw, reply_type)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise FileServiceBroken("the sandbox's file service answered out of protocol") from None
