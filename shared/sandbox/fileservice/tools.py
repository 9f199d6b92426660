"""The agent's file tools: read, write, edit and list, and emptying the workspace.

Each answers what the model sees in its tool result; a refusal's message is for
the model.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .frames import Frames
from .paths import (
    Refused,
    Workspace,
    file_too_large,
    make_parents,
    open_regular,
    read_all,
    write_all,
)
from .walk import Budget

if TYPE_CHECKING:  # typing costs the service's start-up time
    from typing import Any


# ---- the file tools ---------------------------------------------------------------


def _read_capped(fd: int, shown: str, limit: int) -> bytes:
    """The file's bytes, refused when it is (or grows while read) over `limit`."""
    if os.fstat(fd).st_size > limit:
        raise file_too_large(shown, limit)
    data = read_all(fd, limit)
    if len(data) > limit:
        raise file_too_large(shown, limit)
    return data


def read_text(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    shown = str(request["path"])
    limit = int(request["max_file_bytes"])
    try:
        fd = open_regular(ws, ws.relative(shown), os.O_RDONLY, shown)
    except FileNotFoundError:
        raise Refused(f"no file at {shown!r}", "not_found") from None
    try:
        data = _read_capped(fd, shown, limit)
    finally:
        os.close(fd)
    text = data.decode(errors="replace")
    start, end = request.get("start_line"), request.get("end_line")
    if start is not None or end is not None:
        lines = text.splitlines(keepends=True)
        first = (start or 1) - 1
        last = end or len(lines)
        if first >= len(lines) or last < first + 1:
            raise Refused(f"{shown!r} has {len(lines)} lines; that range is empty")
        text = "".join(lines[first:last])
    encoded = text.encode()
    cap = int(request["max_bytes"])
    kept = encoded[:cap].decode(errors="ignore")
    return {"ok": True, "text": kept, "omitted": max(0, len(encoded) - cap)}


def write_text(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    shown = str(request["path"])
    rel = ws.relative(shown)
    if rel == ".":
        raise Refused(f"{shown!r} is a directory", "is_a_directory")
    data = str(request["content"]).encode()
    make_parents(ws, rel, shown)
    fd = open_regular(ws, rel, os.O_WRONLY | os.O_CREAT, shown)
    try:
        os.ftruncate(fd, 0)
        write_all(fd, data)
    finally:
        os.close(fd)
    return {"ok": True, "path": rel, "size": len(data)}


def edit(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    shown = str(request["path"])
    rel = ws.relative(shown)
    old, new = str(request["old"]), str(request["new"])
    limit = int(request["max_file_bytes"])
    try:
        fd = open_regular(ws, rel, os.O_RDWR, shown)
    except FileNotFoundError:
        raise Refused(f"no file at {shown!r}", "not_found") from None
    try:
        data = _read_capped(fd, shown, limit)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise Refused(f"{shown!r} is not UTF-8 text") from None
        count = text.count(old)
        if count == 0:
            raise Refused(f"`old` does not occur in {shown!r}; read the file first")
        if count > 1:
            raise Refused(
                f"`old` occurs {count} times in {shown!r}; include more context to make it unique"
            )
        changed = text.replace(old, new, 1).encode()
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, changed)
        os.ftruncate(fd, len(changed))
    finally:
        os.close(fd)
    return {"ok": True, "path": rel}


# ---- listing and globs -------------------------------------------------------------


def _walk(
    directory: int, parts: tuple[str, ...], depth: int, budget: Budget
) -> Iterator[tuple[os.DirEntry[str], tuple[str, ...], int]]:
    """Every entry under an open directory, with its path parts and the
    directory's descriptor; subdirectories are opened by name relative to their
    parent without following a symlink, so a walk never leaves the tree."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if budget.stopped is not None or not budget.spend():
                return
            here = (*parts, entry.name)
            yield entry, here, directory
            if len(here) < depth and entry.is_dir(follow_symlinks=False):
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    child = os.open(entry.name, flags, dir_fd=directory)
                except OSError:
                    continue
                try:
                    yield from _walk(child, here, depth, budget)
                finally:
                    os.close(child)


def compile_glob(pattern: str) -> tuple[tuple[str, ...], int]:
    """A glob's segments and the depth it can reach (`**` matches any number of
    directories, none included)."""
    if pattern.startswith("/"):
        raise Refused("the glob must be relative to the listed directory")
    segments = tuple(s for s in pattern.split("/") if s and s != ".")
    if not segments or len(segments) > 32 or segments.count("**") > 4:
        raise Refused("the glob must have 1 to 32 parts, at most 4 of them `**`")
    if ".." in segments:
        raise Refused("the glob may not contain `..`")
    return segments, 64 if "**" in segments else len(segments)


def glob_matcher(segments: tuple[str, ...]) -> Callable[[tuple[str, ...]], bool]:
    def matches(parts: tuple[str, ...]) -> bool:
        @functools.cache
        def match(i: int, j: int) -> bool:
            if i == len(segments):
                return j == len(parts)
            if segments[i] == "**":
                return match(i + 1, j) or (j < len(parts) and match(i, j + 1))
            return (
                j < len(parts)
                and fnmatch.fnmatchcase(parts[j], segments[i])
                and match(i + 1, j + 1)
            )

        return match(0, 0)

    return matches


def _shown(ws: Workspace, base: str, entry: os.DirEntry[str], parts: tuple[str, ...]) -> str | None:
    """An entry as a listing shows it: directories end in `/`; a symlink shows
    as what it points to, unless that lies outside the workspace (or nowhere)."""
    name = os.path.normpath(os.path.join(base, *parts))
    if not entry.is_symlink():
        return name + "/" if entry.is_dir(follow_symlinks=False) else name
    try:
        fd = ws.open(name, os.O_PATH, name)
    except (Refused, OSError):
        return None
    try:
        return name + "/" if stat.S_ISDIR(os.fstat(fd).st_mode) else name
    finally:
        os.close(fd)


def list_files(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    shown = str(request["path"])
    base = ws.relative(shown)
    try:
        top = ws.open(base, os.O_RDONLY | os.O_DIRECTORY, shown)
    except (FileNotFoundError, NotADirectoryError):
        raise Refused(f"no directory at {shown!r}", "not_found") from None
    limit = int(request["max_entries"])
    budget = Budget(int(request["max_examined"]), float(request["max_seconds"]))
    names: list[str] = []
    more = False
    pattern = request.get("glob")
    try:
        if pattern:
            segments, depth = compile_glob(str(pattern))
            matches = glob_matcher(segments)
        else:
            depth = 1
        for entry, parts, _ in _walk(top, (), depth, budget):
            if pattern and not matches(parts):
                continue
            name = _shown(ws, base, entry, parts)
            if name is None:
                continue
            if len(names) == limit:
                more = True
                break
            names.append(name)
    finally:
        os.close(top)
    names.sort()
    return {"ok": True, "entries": names, "more": more, "stopped": budget.stopped}


def clear(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    """Remove everything in the workspace (the sandbox is being deleted)."""
    import shutil

    left = 0
    with os.scandir(ws.fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        try:
            if is_dir:
                shutil.rmtree(name, dir_fd=ws.fd)
            else:
                os.unlink(name, dir_fd=ws.fd)
        except OSError:
            left += 1
    return {"ok": True, "left": left}
