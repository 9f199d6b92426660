"""Files in and out of the workspace, for the files API: upload, download, list, remove.

An upload is written to an unnamed file (O_TMPFILE) in the target's directory
and linked into place only when all of it arrived, with the target's
preconditions checked again at that moment: a reader never sees half a file,
and an upload cut off by a client, a timeout or a killed service leaves
nothing behind. Where the filesystem has no O_TMPFILE (NFS), a hidden named
file stands in for it. Downloads hash the file (its sha256 is the ETag) and
send it from the same descriptor, so the bytes are those of the file hashed
even if it is replaced meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import time
from typing import Any

from .frames import CHUNK, Frames
from .paths import Refused, Workspace, make_parents, remove_made, write_all
from .walk import Budget, walk_sorted

_HASH_CHUNK = 1 << 20
# A file whose inode changed less than this long ago may still change within
# the same timestamp tick, unseen by its stat: its hash is not to be cached.
_STABLE_NS = 2_000_000_000
_TEMPORARY_PREFIX = ".sandstream-upload-"
MAX_LIST_DEPTH = 64


def stat_key(info: os.stat_result) -> list[int]:
    """What identifies one version of a file, as far as its stat can tell."""
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def sha256_of(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None  # FIFOs, sockets, devices: not part of a listing


# ---- upload ------------------------------------------------------------------------------


def _target(ws: Workspace, rel: str, shown: str) -> tuple[os.stat_result | None, int | None]:
    """What `rel` is now (following links beneath the root), and a descriptor
    of it when it is a regular file."""
    try:
        fd = ws.open(rel, os.O_RDONLY, shown)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except Refused:
        return None, None  # a link leading out: no representation here
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ELOOP):
            return None, None
        raise
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        os.set_blocking(fd, True)
        return info, fd
    os.close(fd)
    return info, None


def _check_preconditions(
    ws: Workspace, rel: str, shown: str, request: dict[str, Any]
) -> list[int] | None:
    """Refuse when If-Match or If-None-Match does not hold (RFC 9110 §13.1.1-2);
    returns the target's version they were checked against."""
    if_match, if_none_match = request.get("if_match"), request.get("if_none_match")
    info, fd = _target(ws, rel, shown)
    try:
        current = None
        if fd is not None and (isinstance(if_match, list) or isinstance(if_none_match, list)):
            current = sha256_of(fd)
    finally:
        if fd is not None:
            os.close(fd)
    exists = info is not None
    if (if_match == "*" and not exists) or (isinstance(if_match, list) and current not in if_match):
        raise Refused(f"{shown!r} is not the version If-Match names", "precondition_failed")
    if (if_none_match == "*" and exists) or (
        isinstance(if_none_match, list) and current is not None and current in if_none_match
    ):
        raise Refused(f"{shown!r} exists (If-None-Match)", "precondition_failed")
    return stat_key(info) if info is not None else None


def temporary_file(directory: int, access: int = os.O_WRONLY) -> tuple[int, str | None]:
    """An unnamed file in `directory` (or a hidden named one, where O_TMPFILE
    is not supported), for this process only."""
    try:
        flags = os.O_TMPFILE | access | os.O_CLOEXEC
        return os.open(".", flags, 0o600, dir_fd=directory), None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    name = _TEMPORARY_PREFIX + secrets.token_hex(8)
    flags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=directory), name


def _nearest_directory(ws: Workspace, rel: str, shown: str) -> int:
    """The directory `rel` or, if it does not exist yet, its nearest ancestor that does."""
    while True:
        try:
            return ws.open(rel, os.O_RDONLY | os.O_DIRECTORY, shown)
        except FileNotFoundError:
            if rel == ".":
                raise
            rel = os.path.dirname(rel) or "."
        except NotADirectoryError:
            raise Refused(f"a parent of {shown!r} is not a directory", "not_a_directory") from None


def _commit(fd: int, named: str | None, holder: int, parent: int, name: str, replace: bool) -> None:
    """Put the written file (unnamed, or `named` in the directory `holder`) at
    `name` in `parent`: over what is there, or only if nothing is."""
    source, source_dir = named, holder
    if source is None:
        source, source_dir = _TEMPORARY_PREFIX + secrets.token_hex(8), parent
        os.link(f"/proc/self/fd/{fd}", source, dst_dir_fd=parent, follow_symlinks=True)
    try:
        if replace:
            os.rename(source, name, src_dir_fd=source_dir, dst_dir_fd=parent)
            source = None
        else:
            os.link(source, name, src_dir_fd=source_dir, dst_dir_fd=parent, follow_symlinks=False)
    except FileExistsError:
        raise Refused(f"{name!r} exists (If-None-Match)", "precondition_failed") from None
    except IsADirectoryError:
        raise Refused(f"{name!r} is a directory", "is_a_directory") from None
    finally:
        if source is not None:
            os.unlink(source, dir_fd=source_dir)


def _existing(parent: int, name: str, shown: str) -> os.stat_result | None:
    """What `name` is now in `parent` (not following a link); a directory is refused."""
    try:
        before = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(before.st_mode):
        raise Refused(f"{shown!r} is a directory", "is_a_directory")
    return before


def _receive(fd: int, request: dict[str, Any], frames: Frames) -> Any:
    frames.write_json({"ok": True, "ready": True})
    digest = hashlib.sha256()
    for chunk in frames.data_in(int(request["max_bytes"])).chunks():
        write_all(fd, chunk)
        digest.update(chunk)
    return digest


def put(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """Write the data to come to a file: it appears whole when all of it came,
    with its parent directories (which, like the file, are not made before)."""
    shown = str(request["path"])
    rel = ws.relative(shown)
    if rel == ".":
        raise Refused("the workspace root is a directory", "is_a_directory")
    conditional = request.get("if_match") is not None or request.get("if_none_match") is not None
    checked = _check_preconditions(ws, rel, shown, request) if conditional else None
    parent_rel, name = os.path.split(rel)
    holder = _nearest_directory(ws, parent_rel or ".", shown)
    try:
        fd, named = temporary_file(holder)
        try:
            digest = _receive(fd, request, frames)
            if conditional:
                info, held = _target(ws, rel, shown)
                if held is not None:
                    os.close(held)
                if (stat_key(info) if info is not None else None) != checked:
                    _check_preconditions(ws, rel, shown, request)  # changed meanwhile
            made = make_parents(ws, rel, shown)
            try:
                parent = ws.open_dir(parent_rel or ".", shown)
                try:
                    before = _existing(parent, name, shown)
                    regular = before is not None and stat.S_ISREG(before.st_mode)
                    os.fchmod(fd, stat.S_IMODE(before.st_mode) if before and regular else 0o644)
                    replace = request.get("if_none_match") != "*"
                    committing, named = named, None  # _commit removes its name on failure
                    _commit(fd, committing, holder, parent, name, replace)
                finally:
                    os.close(parent)
            except BaseException:
                remove_made(ws, made)
                raise
            info = os.fstat(fd)
        finally:
            os.close(fd)
            if named is not None:
                os.unlink(named, dir_fd=holder)
    finally:
        os.close(holder)
    return {
        "ok": True,
        "path": rel,
        "created": before is None,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "sha256": digest.hexdigest(),
    }


# ---- download --------------------------------------------------------------------------


def open_file(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any] | None:
    """Tell what the path is; for a file, its size, version and sha256, then send
    the byte range the follow-up request asks for (`{"offset", "length"}`) as
    data frames and an end."""
    shown = str(request["path"])
    rel = ws.relative(shown)
    try:
        fd = ws.open(rel, os.O_RDONLY, shown)
    except (FileNotFoundError, NotADirectoryError):
        raise Refused(f"no file or directory at {shown!r}", "not_found") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ELOOP):
            raise Refused(f"{shown!r} is not a regular file", "not_a_file") from None
        raise
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            return {"ok": True, "type": "dir", "path": rel, "mtime_ns": info.st_mtime_ns}
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{shown!r} is not a regular file", "not_a_file")
        os.set_blocking(fd, True)
        key = stat_key(info)
        stable = time.time_ns() - info.st_ctime_ns > _STABLE_NS
        digest = None if request.get("known") == key else sha256_of(fd)
        stable = stable and stat_key(os.fstat(fd)) == key
        frames.write_json(
            {
                "ok": True,
                "type": "file",
                "path": rel,
                "key": key,
                "sha256": digest,
                "stable": stable,
            }
        )
        follow = frames.read_request()
        if follow is None:
            return None
        offset, remaining = int(follow["offset"]), int(follow["length"])
        while remaining > 0:
            chunk = os.pread(fd, min(CHUNK, remaining), offset)
            if not chunk:
                break  # the file shrank since: the client sees a short body
            frames.write_data(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
        frames.write_end()
        return None
    finally:
        os.close(fd)


# ---- listing -------------------------------------------------------------------------------


def _joined(base: str, parts: tuple[str, ...]) -> str:
    return "/".join(parts) if base == "." else "/".join((base, *parts))


def list_dir(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """One page of a directory's entries (or of its whole tree), in path order,
    after the `cursor` path."""
    shown = str(request["path"])
    base = ws.relative(shown)
    limit = int(request["limit"])
    after: tuple[str, ...] | None = None
    if request.get("cursor") is not None:
        cursor = ws.relative(str(request["cursor"]))
        prefix = "" if base == "." else base + "/"
        if cursor == base or not cursor.startswith(prefix):
            raise Refused("the cursor does not belong to this listing", "invalid_cursor")
        after = tuple(cursor[len(prefix) :].split("/"))
    top = ws.open_dir(base, shown)
    budget = Budget(int(request["max_examined"]), float(request["max_seconds"]))
    depth = MAX_LIST_DEPTH if request.get("recursive") else 1
    entries: list[dict[str, Any]] = []
    more = False
    try:
        for found in walk_sorted(top, budget, depth, after):
            kind = _kind(found.info.st_mode)
            if kind is None:
                continue
            if len(entries) == limit:
                more = True
                break
            entries.append(
                {
                    "path": os.path.join(base, *found.parts)
                    if base != "."
                    else "/".join(found.parts),
                    "type": kind,
                    "size": found.info.st_size if kind != "dir" else 0,
                    "mtime_ns": found.info.st_mtime_ns,
                }
            )
    finally:
        os.close(top)
    resume: str | None = None
    if more:
        resume = entries[-1]["path"]
    elif budget.stopped is not None and budget.last:
        resume = _joined(base, budget.last)
    return {"ok": True, "entries": entries, "next": resume, "stopped": budget.stopped}


# ---- removal ------------------------------------------------------------------------------


def remove(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """Remove a file or link (never what a link points to), or a directory:
    empty, or with all it holds when `recursive`."""
    shown = str(request["path"])
    rel = ws.relative(shown)
    if rel == ".":
        raise Refused("the workspace root cannot be removed", "invalid_path")
    parent_rel, name = os.path.split(rel)
    try:
        parent = ws.open(parent_rel or ".", os.O_RDONLY | os.O_DIRECTORY, shown)
    except (FileNotFoundError, NotADirectoryError):
        raise Refused(f"no file or directory at {shown!r}", "not_found") from None
    try:
        try:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(f"no file or directory at {shown!r}", "not_found") from None
        if not stat.S_ISDIR(info.st_mode):
            os.unlink(name, dir_fd=parent)
        elif request.get("recursive"):
            import shutil

            # The descriptor-based rmtree: it never follows a link out of the tree.
            shutil.rmtree(name, dir_fd=parent)
        else:
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise Refused(
                        f"{shown!r} is a directory that is not empty (remove it recursively)",
                        "not_empty",
                    ) from None
                raise
    finally:
        os.close(parent)
    return {"ok": True, "path": rel, "type": _kind(info.st_mode) or "other"}
