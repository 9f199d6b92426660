"""What a turn changed in the workspace: a snapshot before, and the difference after.

A snapshot is each entry's path, kind, inode, size and modification time, from
one walk that stats every entry and reads no file; that is cheap enough to take
around every turn that uses tools (10,000 files: see bench/). It goes to the
worker as a compressed blob (the worker keeps no file names of its own) and
comes back with the request for the difference, so a file service restarted
in between (after an interrupt, say) loses nothing.

The walk is bounded; a walk cut short covers a prefix of the sorted order, so
the difference is exact up to where the shorter walk stopped and marked
`truncated` beyond. A file rewritten within one timestamp tick with the same
size and inode is not seen as modified (a limit of any stat-based check).
"""

from __future__ import annotations

import os
import stat
import zlib
from typing import Any

from .frames import Frames
from .paths import Refused, Workspace
from .walk import Budget, walk_sorted

MAX_DEPTH = 64
_MAGIC = b"sandstream-snapshot-1"
_KINDS = {"f": "file", "d": "dir", "l": "symlink"}

Record = tuple[str, int, int, int]  # kind, inode, size, mtime_ns


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return None


def _collect(ws: Workspace, request: dict[str, Any]) -> tuple[dict[bytes, Record], bytes | None]:
    """Every entry of the workspace; and, when the walk was cut short, the path
    it stopped at (nothing after it was seen)."""
    budget = Budget(int(request["max_entries"]), float(request["max_seconds"]))
    records: dict[bytes, Record] = {}
    for found in walk_sorted(ws.fd, budget, MAX_DEPTH):
        info = found.info
        kind = _kind(info.st_mode)
        if kind is None:
            continue  # FIFOs, sockets: not what the files API shows
        path = os.fsencode("/".join(found.parts))
        records[path] = (kind, info.st_ino, info.st_size, info.st_mtime_ns)
    stopped = os.fsencode("/".join(budget.last)) if budget.stopped is not None else None
    return records, stopped


def _encode(records: dict[bytes, Record], stopped: bytes | None) -> bytes:
    parts = [_MAGIC, stopped if stopped is not None else b"-"]
    for path, (kind, inode, size, mtime) in records.items():
        parts.append(path)
        parts.append(f"{kind}:{inode}:{size}:{mtime}".encode())
    return zlib.compress(b"\0".join(parts), 1)


def _decode(blob: bytes, limit: int) -> tuple[dict[bytes, Record], bytes | None]:
    inflate = zlib.decompressobj()
    raw = inflate.decompress(blob, limit)
    if inflate.unconsumed_tail:
        raise Refused("the snapshot is too large", "malformed")
    fields = raw.split(b"\0")
    if len(fields) < 2 or fields[0] != _MAGIC or len(fields) % 2:
        raise Refused("not a snapshot of this service", "malformed")
    records: dict[bytes, Record] = {}
    for index in range(2, len(fields), 2):
        kind, inode, size, mtime = fields[index + 1].decode().split(":")
        records[fields[index]] = (kind, int(inode), int(size), int(mtime))
    return records, None if fields[1] == b"-" else fields[1]


def snapshot(ws: Workspace, request: dict[str, Any], frames: Frames) -> None:
    records, stopped = _collect(ws, request)
    blob = _encode(records, stopped)
    frames.write_json({"ok": True, "entries": len(records), "truncated": stopped is not None})
    frames.write_data(blob)
    frames.write_end()


def _order(path: bytes) -> tuple[bytes, ...]:
    return tuple(path.split(b"/"))


def changes(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """The difference between the snapshot sent (as data) and the workspace now."""
    frames.write_json({"ok": True, "ready": True})
    blob = frames.data_in(int(request["max_snapshot_bytes"])).read()
    before, stopped_before = _decode(blob, int(request["max_snapshot_bytes"]) * 20)
    after, stopped_after = _collect(ws, request)
    ends = [_order(s) for s in (stopped_before, stopped_after) if s is not None]
    horizon = min(ends) if ends else None
    found: list[dict[str, Any]] = []
    for path in sorted(before.keys() | after.keys(), key=_order):
        if horizon is not None and _order(path) > horizon:
            break
        old, new = before.get(path), after.get(path)
        size: int | None
        if old is None:
            assert new is not None
            change, kind, size = "created", new[0], new[2]
        elif new is None:
            change, kind, size = "deleted", old[0], None
        elif old[0] != new[0] or (new[0] != "d" and old != new):
            # A directory's own stat changes with its entries: only those are told.
            change, kind, size = "modified", new[0], new[2]
        else:
            continue
        found.append(
            {
                "path": os.fsdecode(path),
                "change": change,
                "type": _KINDS.get(kind, "file"),
                "size": 0 if kind == "d" and size is not None else size,
            }
        )
    limit = int(request["max_changes"])
    return {
        "ok": True,
        "changes": found[:limit],
        "truncated": horizon is not None or len(found) > limit,
    }
