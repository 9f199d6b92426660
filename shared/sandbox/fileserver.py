"""The file service that runs inside a sandbox, serving the agent's file tools.

`shared.sandbox.files.FileClient` starts it under the sandbox's own confinement
(bubblewrap, the sandbox's uid, its cgroup, no network), so whatever a request
names, the kernel decides what it can reach: not a path check in a privileged
process that a symlink swapped in at the right moment could defeat. Within
that, it keeps every operation inside the workspace root it is given, opens
regular files only and never blocks on a FIFO or a device, never follows a
symlink while walking, and bounds every walk in depth, entries and time.

It uses the standard library only: it runs as `python -I -S` and sees no
site-packages. Nothing it answers is trusted by the client, which decodes each
reply into a typed struct with size limits.

Protocol on stdin/stdout, one request at a time: frames of a kind byte, a 4-byte
big-endian length and a payload; kind `J` carries a JSON object (a request, or
the reply to one).
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import json
import os
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

HEADER = struct.Struct(">cI")
MAX_REQUEST_BYTES = 64 << 20


class Refused(Exception):
    """A request the service will not carry out; the message is for the model."""


# ---- paths ----------------------------------------------------------------------

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # x86-64 and aarch64 alike


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


class Workspace:
    """The workspace root, held open: every path is opened relative to it with
    openat2(RESOLVE_BENEATH), which fails rather than leave the root, atomically,
    however the path's components are swapped for symlinks meanwhile."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.beneath = True

    def relative(self, path: str) -> str:
        """`path` relative to the root, lexically (refusing what names a place outside)."""
        if "\x00" in path:
            raise Refused("the path contains a NUL byte")
        if os.path.isabs(path):
            if path != self.root and not path.startswith(self.root + "/"):
                raise Refused(f"{path!r} is outside the sandbox workspace")
            path = path[len(self.root) :].lstrip("/")
        rel = os.path.normpath(path or ".")
        if rel == ".." or rel.startswith("../"):
            raise Refused(f"{path!r} is outside the sandbox workspace")
        return rel

    def open(self, rel: str, flags: int, shown: str, mode: int = 0o644) -> int:
        # openat2 refuses flags that do nothing with O_PATH.
        flags |= os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NONBLOCK
        if self.beneath:
            how = _OpenHow(flags, mode if flags & os.O_CREAT else 0)
            how.resolve = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
            fd = int(_libc.syscall(_SYS_OPENAT2, self.fd, rel.encode(), ctypes.byref(how), 24))
            if fd >= 0:
                return fd
            code = ctypes.get_errno()
            if code != errno.ENOSYS:
                if code == errno.EXDEV:
                    raise Refused(f"{shown!r} is outside the sandbox workspace")
                raise OSError(code, os.strerror(code), os.path.join(self.root, rel))
            self.beneath = False  # a kernel before 5.6: resolve, then open
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self.root + "/"):
            raise Refused(f"{shown!r} is outside the sandbox workspace")
        return os.open(real, flags | os.O_NOFOLLOW, mode)


def open_regular(ws: Workspace, rel: str, flags: int, shown: str) -> int:
    """Open a regular file without ever blocking (a FIFO with no writer would
    hang a plain open) and without following a final symlink out."""
    try:
        fd = ws.open(rel, flags, shown)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, or a socket
            raise Refused(f"{shown!r} is not a regular file") from None
        if exc.errno == errno.ELOOP:
            raise Refused(f"{shown!r} is a link this service does not follow") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Refused(f"{shown!r} is a directory")
        raise Refused(f"{shown!r} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def file_too_large(shown: str, limit: int) -> Refused:
    return Refused(f"{shown!r} is larger than {limit} bytes")


# ---- the file tools ---------------------------------------------------------------


def read_text(ws: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    shown = str(request["path"])
    limit = int(request["max_file_bytes"])
    try:
        fd = open_regular(ws, ws.relative(shown), os.O_RDONLY, shown)
    except FileNotFoundError:
        raise Refused(f"no file at {shown!r}") from None
    try:
        if os.fstat(fd).st_size > limit:
            raise file_too_large(shown, limit)
        data = read_all(fd, limit)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise file_too_large(shown, limit)
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


def _make_parents(ws: Workspace, rel: str, shown: str) -> None:
    """Create the directories `rel` needs, one at a time, each beneath the root."""
    parent = os.path.dirname(rel)
    if not parent:
        return
    if _exists(ws, parent, shown):
        return
    done = ""
    for part in parent.split("/"):
        here = os.path.join(done, part) if done else part
        directory = ws.open(done or ".", os.O_RDONLY | os.O_DIRECTORY, shown)
        try:
            os.mkdir(part, 0o755, dir_fd=directory)
        except FileExistsError:
            pass
        finally:
            os.close(directory)
        done = here


def _exists(ws: Workspace, rel: str, shown: str) -> bool:
    try:
        os.close(ws.open(rel, os.O_PATH, shown))
    except FileNotFoundError:
        return False
    return True


def write_text(ws: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    shown = str(request["path"])
    rel = ws.relative(shown)
    if rel == ".":
        raise Refused(f"{shown!r} is a directory")
    data = str(request["content"]).encode()
    _make_parents(ws, rel, shown)
    fd = open_regular(ws, rel, os.O_WRONLY | os.O_CREAT, shown)
    try:
        os.ftruncate(fd, 0)
        write_all(fd, data)
    finally:
        os.close(fd)
    return {"ok": True, "path": rel, "size": len(data)}


def edit(ws: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    shown = str(request["path"])
    rel = ws.relative(shown)
    old, new = str(request["old"]), str(request["new"])
    limit = int(request["max_file_bytes"])
    try:
        fd = open_regular(ws, rel, os.O_RDWR, shown)
    except FileNotFoundError:
        raise Refused(f"no file at {shown!r}") from None
    try:
        if os.fstat(fd).st_size > limit:
            raise file_too_large(shown, limit)
        data = read_all(fd, limit)
        if len(data) > limit:
            raise file_too_large(shown, limit)
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


class Budget:
    """How much a walk may examine, and for how long."""

    def __init__(self, entries: int, seconds: float) -> None:
        self.entries = entries
        self.deadline = time.monotonic() + seconds
        self.examined = 0
        self.stopped: str | None = None

    def spend(self) -> bool:
        self.examined += 1
        if self.examined > self.entries:
            self.stopped = f"examined {self.entries} entries"
        elif self.examined % 256 == 0 and time.monotonic() > self.deadline:
            self.stopped = "ran out of time"
        return self.stopped is None


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


def list_files(ws: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    shown = str(request["path"])
    base = ws.relative(shown)
    try:
        top = ws.open(base, os.O_RDONLY | os.O_DIRECTORY, shown)
    except (FileNotFoundError, NotADirectoryError):
        raise Refused(f"no directory at {shown!r}") from None
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


def clear(ws: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    """Remove everything in the workspace (the sandbox is being deleted)."""
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


OPS: dict[str, Callable[[Workspace, dict[str, Any]], dict[str, Any]]] = {
    "read_text": read_text,
    "write_text": write_text,
    "edit": edit,
    "list": list_files,
    "clear": clear,
}


# ---- the loop ------------------------------------------------------------------------


def describe_os_error(ws: Workspace, exc: OSError) -> str:
    """An OSError for the model: its reason, with a workspace-relative path at most."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.EDQUOT:
        reason = "the sandbox's disk quota is exhausted (Disk quota exceeded)"
    elif exc.errno == errno.ENOSPC:
        reason = "no space left on the sandbox's disk"
    name = exc.filename
    if isinstance(name, str) and (name == ws.root or name.startswith(ws.root + "/")):
        return f"{os.path.relpath(name, ws.root)}: {reason}"
    return reason


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    kind, size = HEADER.unpack(head)
    if kind != b"J" or size > MAX_REQUEST_BYTES:
        raise SystemExit(2)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(HEADER.pack(b"J", len(payload)) + payload)
    stream.flush()


def serve(ws: Workspace, requests: BinaryIO, replies: BinaryIO) -> None:
    while (payload := read_frame(requests)) is not None:
        try:
            request = json.loads(payload)
            reply = OPS[request["op"]](ws, request)
        except Refused as exc:
            reply = {"ok": False, "error": str(exc)}
        except OSError as exc:
            reply = {"ok": False, "error": describe_os_error(ws, exc)}
        except (KeyError, TypeError, ValueError):
            reply = {"ok": False, "error": "malformed request"}
        write_frame(replies, json.dumps(reply, ensure_ascii=False).encode())


def main() -> None:
    ws = Workspace(sys.argv[1])
    os.chdir(ws.root)
    serve(ws, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
