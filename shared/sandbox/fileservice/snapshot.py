"""What a turn changed in the workspace: a snapshot before, and the difference after.

A snapshot is each entry's path, kind, inode, size and modification time, from
one walk that stats every entry (one fstatat each) and reads no file. It goes to
the worker as a compressed blob (the worker keeps no file names of its own) and
comes back with the request for the difference, so a file service restarted in
between (after an interrupt, say) loses nothing. Both walks visit entries in
the same order (depth-first, each directory's names sorted as bytes), so the
difference is a merge of two ordered sequences: no table of either is built.
The cost is about that of one `find -ls` of the workspace per walk (bench/).

The walk is bounded; a walk cut short covers a prefix of that order, so the
difference is exact up to where the shorter walk stopped and is marked
`truncated`. A file rewritten within one timestamp tick with the same size and
inode is not seen as modified (a limit of any stat-based check).
"""

from __future__ import annotations

import os
import stat
import struct
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .frames import Frames
from .paths import Refused, Workspace

if TYPE_CHECKING:  # typing costs the service's start-up time
    from typing import Any


MAX_DEPTH = 64
_MAGIC = b"sandstream-snapshot-2\n"
_HEAD = struct.Struct("<I")  # the path's length; the path; then:
_META = struct.Struct("<BQQq")  # kind, inode, size, mtime in ns
_FILE, _DIR, _LINK = ord("f"), ord("d"), ord("l")
_KINDS = {_FILE: "file", _DIR: "dir", _LINK: "symlink"}
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Record = tuple[bytes, int, int, int, int]  # path, kind, inode, size, mtime_ns


class _Walk:
    """The workspace's entries in order, within a budget of entries and time."""

    def __init__(self, ws: Workspace, request: dict[str, Any]) -> None:
        self.limit = int(request["max_entries"])
        self.deadline = time.monotonic() + float(request["max_seconds"])
        self.examined = 0
        self.stopped_at: bytes | None = None  # the last path seen, when cut short
        self.records = self._directory(ws.fd, b"", 1)

    def _directory(self, directory: int, prefix: bytes, depth: int) -> Iterator[Record]:
        with os.scandir(directory) as scan:
            names = sorted(e.name.encode("utf-8", "surrogateescape") for e in scan)
        for name in names:
            path = prefix + name
            self.examined += 1
            if self.examined > self.limit or (
                not self.examined % 256 and time.monotonic() > self.deadline
            ):
                self.stopped_at = path
                return
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the directory was read
            mode = info.st_mode
            if stat.S_ISREG(mode):
                yield path, _FILE, info.st_ino, info.st_size, info.st_mtime_ns
            elif stat.S_ISLNK(mode):
                yield path, _LINK, info.st_ino, info.st_size, info.st_mtime_ns
            elif stat.S_ISDIR(mode):
                yield path, _DIR, info.st_ino, 0, info.st_mtime_ns
                if depth < MAX_DEPTH:
                    try:
                        child = os.open(name, _OPEN_DIR, dir_fd=directory)
                    except OSError:
                        continue
                    try:
                        yield from self._directory(child, path + b"/", depth + 1)
                    finally:
                        os.close(child)
                    if self.stopped_at is not None:
                        return
            # FIFOs, sockets: not what the files API shows


def _encode(walk: _Walk) -> tuple[bytes, int]:
    parts = [_MAGIC]
    count = 0
    for path, kind, inode, size, mtime in walk.records:
        parts += (_HEAD.pack(len(path)), path, _META.pack(kind, inode, size, mtime))
        count += 1
    # The point a cut-short walk stopped at comes last, as a record of kind 0.
    if walk.stopped_at is not None:
        parts += (_HEAD.pack(len(walk.stopped_at)), walk.stopped_at, _META.pack(0, 0, 0, 0))
    return zlib.compress(b"".join(parts), 1), count


class _Before:
    """The records of a snapshot blob, read in order."""

    def __init__(self, blob: bytes, limit: int) -> None:
        inflate = zlib.decompressobj()
        self.raw = inflate.decompress(blob, limit)
        if inflate.unconsumed_tail or not self.raw.startswith(_MAGIC):
            raise Refused("not a snapshot of this service, or too large", "malformed")
        self.stopped_at: bytes | None = None

    def records(self) -> Iterator[Record]:
        raw, offset = self.raw, len(_MAGIC)
        while offset < len(raw):
            (length,) = _HEAD.unpack_from(raw, offset)
            path = raw[offset + 4 : offset + 4 + length]
            offset += 4 + length
            kind, inode, size, mtime = _META.unpack_from(raw, offset)
            offset += _META.size
            if kind == 0:
                self.stopped_at = path
                return
            yield path, kind, inode, size, mtime


def snapshot(ws: Workspace, request: dict[str, Any], frames: Frames) -> None:
    walk = _Walk(ws, request)
    blob, count = _encode(walk)
    frames.write_json({"ok": True, "entries": count, "truncated": walk.stopped_at is not None})
    frames.write_data(blob)
    frames.write_end()


def _order(path: bytes) -> list[bytes]:
    return path.split(b"/")


def _change(change: str, record: Record, deleted: bool = False) -> dict[str, Any]:
    return {
        "path": record[0].decode("utf-8", "replace"),
        "change": change,
        "type": _KINDS[record[1]],
        "size": None if deleted else record[3],
    }


def _merge(
    before: Iterator[Record], after: Iterator[Record]
) -> Iterator[tuple[bytes, str, Record]]:
    """The differences of two record sequences in walk order: (path, change, record)."""
    old, new = next(before, None), next(after, None)
    while old is not None or new is not None:
        if old is not None and new is not None and old[0] == new[0]:
            if old[1] != new[1] or (new[1] != _DIR and old[2:] != new[2:]):
                # A directory's own stat changes with its entries: only those are told.
                yield new[0], "modified", new
            old, new = next(before, None), next(after, None)
        elif new is None or (old is not None and _order(old[0]) < _order(new[0])):
            assert old is not None
            yield old[0], "deleted", old
            old = next(before, None)
        else:
            yield new[0], "created", new
            new = next(after, None)


def changes(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """The difference between the snapshot sent (as data) and the workspace now."""
    frames.write_json({"ok": True, "ready": True})
    limit = int(request["max_snapshot_bytes"])
    before = _Before(frames.data_in(limit).read(), limit * 20)
    # Both read whole first: where each walk stopped (if it was cut short) is
    # known at its end, and bounds what the difference can tell.
    old_records = list(before.records())
    walk = _Walk(ws, request)
    new_records = list(walk.records)
    ends = [_order(s) for s in (before.stopped_at, walk.stopped_at) if s is not None]
    horizon = min(ends) if ends else None
    most = int(request["max_changes"])
    found: list[dict[str, Any]] = []
    more = False
    for path, change, record in _merge(iter(old_records), iter(new_records)):
        if horizon is not None and _order(path) > horizon:
            break
        if len(found) == most:
            more = True
            break
        found.append(_change(change, record, deleted=change == "deleted"))
    return {"ok": True, "changes": found, "truncated": horizon is not None or more}
