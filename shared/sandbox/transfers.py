"""The files API's conversations with a sandbox's file service, each on a `Channel`.

Data goes through in frames of at most 4 MiB as it arrives, never gathered
whole: an upload is sent on as the request body comes in, a download or an
archive is yielded on as the service writes it, so a 200 MB file never sits in
this process's memory. While an upload or archive streams in, the service's
answer is read at the same time: if it refuses part way (the quota is full, an
entry is refused), the rest of the body is not sent.

Each function ends its conversation (the channel is settled) or raises; the
channel's owner stops a service left mid-conversation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal, TypeVar

import msgspec

from shared.sandbox.files import Channel, FileServiceBroken, decode_reply

T = TypeVar("T", bound=msgspec.Struct)

FileType = Literal["file", "dir", "symlink"]


class Ready(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    ready: bool
    entries: int | None = None


class Written(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    path: str
    created: bool
    size: int
    mtime_ns: int
    sha256: str


class FileHead(msgspec.Struct, tag_field="type", tag="file", forbid_unknown_fields=True):
    """An open file: `key` identifies its version (device, inode, size, mtime,
    ctime); `sha256` is None when it is the version the request said it knew;
    `stable`: its inode has not changed for a while, so the hash may be cached."""

    ok: bool
    path: str
    key: list[int]
    sha256: str | None
    stable: bool

    @property
    def size(self) -> int:
        return self.key[2]

    @property
    def mtime_ns(self) -> int:
        return self.key[3]


class DirHead(msgspec.Struct, tag_field="type", tag="dir", forbid_unknown_fields=True):
    ok: bool
    path: str
    mtime_ns: int


class Listed(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    type: FileType
    size: int
    mtime_ns: int


class ListPage(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    entries: list[Listed]
    next: str | None
    stopped: str | None


class Removed(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    path: str
    type: str


class Unpacked(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    path: str
    entries: int
    bytes: int


class SnapshotHead(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    entries: int
    truncated: bool


class Change(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    change: Literal["created", "modified", "deleted"]
    type: FileType
    size: int | None


class Changes(msgspec.Struct, forbid_unknown_fields=True):
    ok: bool
    changes: list[Change]
    truncated: bool


class ArchiveLimits(msgspec.Struct, frozen=True, kw_only=True):
    entries: int
    bytes: int  # unpacked
    archive_bytes: int  # the archive itself, as sent
    seconds: float


# ---- sending data in -----------------------------------------------------------------------


async def _stream_in(channel: Channel, chunks: AsyncIterable[bytes]) -> asyncio.Task[bytes]:
    """Send `chunks` as data frames while watching for the service's answer;
    returns the task holding its answer frame (already done if it refused part way)."""

    async def answer() -> bytes:
        kind, payload = await channel.frame(timeout=None)
        if kind != b"J":
            raise FileServiceBroken("the sandbox's file service answered out of protocol")
        return payload

    early = asyncio.ensure_future(answer())
    try:
        async for chunk in chunks:
            if early.done():
                break
            if chunk:
                await channel.send_data(chunk)
        if early.done():
            await channel.send_abort()  # the service is reading on to the end: this is it
        else:
            await channel.send_end()
        async with asyncio.timeout(channel.timeout):
            await asyncio.shield(early)
    except BaseException:
        early.cancel()
        raise
    return early


async def _answer(channel: Channel, early: asyncio.Task[bytes], reply_type: type[T]) -> T:
    try:
        reply = decode_reply(early.result(), reply_type)
    finally:
        channel.settled = True
    return reply


async def upload(
    channel: Channel,
    path: str,
    chunks: AsyncIterable[bytes],
    *,
    max_bytes: int,
    if_match: list[str] | Literal["*"] | None = None,
    if_none_match: list[str] | Literal["*"] | None = None,
) -> Written:
    """Write `chunks` to `path`: the file appears whole, or not at all."""
    await channel.send_request(
        "put", path=path, max_bytes=max_bytes, if_match=if_match, if_none_match=if_none_match
    )
    await channel.reply(Ready, final=False)
    early = await _stream_in(channel, chunks)
    return await _answer(channel, early, Written)


async def extract(
    channel: Channel, path: str, chunks: AsyncIterable[bytes], limits: ArchiveLimits
) -> Unpacked:
    """Extract the archive in `chunks` into the directory `path`, all or nothing."""
    await channel.send_request(
        "unpack",
        path=path,
        max_entries=limits.entries,
        max_bytes=limits.bytes,
        max_archive_bytes=limits.archive_bytes,
        max_seconds=limits.seconds,
    )
    await channel.reply(Ready, final=False)
    early = await _stream_in(channel, chunks)
    return await _answer(channel, early, Unpacked)


# ---- reading -------------------------------------------------------------------------------


async def open_path(channel: Channel, path: str, known: list[int] | None) -> FileHead | DirHead:
    """What `path` is. A file stays open in the service until `read_range`
    (which a caller must follow with, even for no bytes)."""
    await channel.send_request("open", path=path, known=known)
    head = await channel.reply(FileHead | DirHead, final=False)  # type: ignore[arg-type]
    if isinstance(head, DirHead):
        channel.settled = True
    return head


async def read_range(channel: Channel, offset: int, length: int) -> AsyncIterator[bytes]:
    """`length` bytes of the open file from `offset` (fewer if it shrank meanwhile)."""
    await channel.send_follow_up(offset=offset, length=length)
    async for chunk in channel.data():
        yield chunk


async def list_dir(
    channel: Channel,
    path: str,
    *,
    recursive: bool,
    limit: int,
    cursor: str | None,
    max_examined: int,
    max_seconds: float,
) -> ListPage:
    await channel.send_request(
        "ls",
        path=path,
        recursive=recursive,
        limit=limit,
        cursor=cursor,
        max_examined=max_examined,
        max_seconds=max_seconds,
    )
    return await channel.reply(ListPage)


async def remove(channel: Channel, path: str, recursive: bool) -> Removed:
    await channel.send_request("rm", path=path, recursive=recursive)
    return await channel.reply(Removed)


async def pack(
    channel: Channel,
    path: str,
    form: str,
    *,
    max_entries: int,
    max_seconds: float,
) -> AsyncIterator[bytes]:
    """`path` as an archive. The first step (awaited before the first chunk)
    refuses what cannot be archived; then the archive's bytes."""
    await channel.send_request(
        "pack", path=path, format=form, max_entries=max_entries, max_seconds=max_seconds
    )
    await channel.reply(Ready, final=False)
    return channel.data()


# ---- what a turn changed -------------------------------------------------------------------


class Snapshot(msgspec.Struct, frozen=True):
    blob: bytes  # the service's own encoding, compressed
    entries: int
    truncated: bool


async def snapshot(
    channel: Channel, *, max_entries: int, max_seconds: float, max_bytes: int
) -> Snapshot:
    await channel.send_request("snapshot", max_entries=max_entries, max_seconds=max_seconds)
    head = await channel.reply(SnapshotHead, final=False)
    parts: list[bytes] = []
    size = 0
    async for chunk in channel.data():
        size += len(chunk)
        if size > max_bytes:
            raise FileServiceBroken("the workspace snapshot is larger than allowed")
        parts.append(chunk)
    return Snapshot(b"".join(parts), head.entries, head.truncated)


async def changes(
    channel: Channel,
    before: Snapshot,
    *,
    max_entries: int,
    max_seconds: float,
    max_changes: int,
    max_bytes: int,
) -> Changes:
    """What differs between `before` and the workspace now."""
    await channel.send_request(
        "changes",
        max_entries=max_entries,
        max_seconds=max_seconds,
        max_changes=max_changes,
        max_snapshot_bytes=max_bytes,
    )
    await channel.reply(Ready, final=False)

    async def blob() -> AsyncIterator[bytes]:
        yield before.blob

    early = await _stream_in(channel, blob())
    return await _answer(channel, early, Changes)
