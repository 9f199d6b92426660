"""Opening paths beneath the workspace, and what a failure is called.

Every path is opened relative to a directory held open, with
openat2(RESOLVE_BENEATH), which fails rather than leave that directory,
atomically, however the path's components are swapped for symlinks meanwhile.
Archive extraction adds RESOLVE_NO_SYMLINKS: it never passes through a link.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing costs the service's start-up time
    from typing import Any


class Refused(Exception):
    """A request the service will not carry out. The message is for the model or
    the API's client (it names paths as they were given, never a host path);
    `code` says what kind of refusal it is; `entry` names an archive entry."""

    def __init__(self, message: str, code: str = "refused", entry: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.entry = entry

    def reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": False, "error": str(self), "code": self.code}
        if self.entry is not None:
            reply["entry"] = self.entry
        return reply


_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # x86-64 and aarch64 alike


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_have_openat2 = [True]


def _openat2(dirfd: int, rel: str, flags: int, mode: int, resolve: int) -> int:
    """openat2(2); OSError on failure (ENOSYS before Linux 5.6)."""
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags, mode if creates else 0, resolve)
    path = os.fsencode(rel)
    fd = int(_libc.syscall(_SYS_OPENAT2, dirfd, path, ctypes.byref(how), 24))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def _flags(flags: int) -> int:
    # openat2 refuses flags that do nothing with O_PATH.
    return flags | (os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NONBLOCK)


def open_no_symlinks(dirfd: int, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open `rel` beneath `dirfd` without passing through any symlink (the last
    component included). ELOOP when one is met, EXDEV when `rel` leads out."""
    flags = _flags(flags)
    if _have_openat2[0]:
        try:
            return _openat2(dirfd, rel, flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _have_openat2[0] = False
    # Before Linux 5.6: one component at a time, none of them a link.
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts or rel.startswith("/"):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    current = dirfd
    try:
        for part in parts[:-1]:
            step = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            following = os.open(part, step, dir_fd=current)
            if current != dirfd:
                os.close(current)
            current = following
        return os.open(parts[-1] if parts else ".", flags | os.O_NOFOLLOW, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def open_beneath(dirfd: int, rel: str, flags: int) -> int:
    """Open `rel` beneath `dirfd`, following links only while they stay beneath
    it: EXDEV when they lead out, ELOOP when they loop."""
    flags = _flags(flags)
    if _have_openat2[0]:
        try:
            return _openat2(dirfd, rel, flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _have_openat2[0] = False
    # Before Linux 5.6 there is no such check; callers' lexical checks stand alone.
    return os.open(rel, flags, dir_fd=dirfd)


class Workspace:
    """The workspace root, held open; paths are opened beneath it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def relative(self, path: str) -> str:
        """`path` relative to the root, lexically (refusing what names a place outside)."""
        if "\x00" in path:
            raise Refused("the path contains a NUL byte", "invalid_path")
        if os.path.isabs(path):
            if path != self.root and not path.startswith(self.root + "/"):
                raise Refused(f"{path!r} is outside the sandbox workspace", "invalid_path")
            path = path[len(self.root) :].lstrip("/")
        rel = os.path.normpath(path or ".")
        if rel == ".." or rel.startswith("../"):
            raise Refused(f"{path!r} is outside the sandbox workspace", "invalid_path")
        return rel

    def open(self, rel: str, flags: int, shown: str, mode: int = 0o644) -> int:
        """Open `rel` beneath the root, following links that stay beneath it."""
        flags = _flags(flags)
        if _have_openat2[0]:
            try:
                return _openat2(
                    self.fd, rel, flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
                )
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise Refused(
                        f"{shown!r} is outside the sandbox workspace", "outside"
                    ) from None
                if exc.errno != errno.ENOSYS:
                    raise OSError(exc.errno, exc.strerror, os.path.join(self.root, rel)) from None
                _have_openat2[0] = False
        # A kernel before 5.6: resolve, then open.
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self.root + "/"):
            raise Refused(f"{shown!r} is outside the sandbox workspace", "outside")
        return os.open(real, flags | os.O_NOFOLLOW, mode)

    def open_dir(self, rel: str, shown: str) -> int:
        """The directory `rel`, or a refusal saying why not."""
        try:
            return self.open(rel, os.O_RDONLY | os.O_DIRECTORY, shown)
        except FileNotFoundError:
            raise Refused(f"no directory at {shown!r}", "not_found") from None
        except NotADirectoryError:
            raise Refused(f"{shown!r} is not a directory", "not_a_directory") from None


def open_regular(ws: Workspace, rel: str, flags: int, shown: str) -> int:
    """Open a regular file without ever blocking (a FIFO with no writer would
    hang a plain open) and without following a final symlink out."""
    try:
        fd = ws.open(rel, flags, shown)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, or a socket
            raise Refused(f"{shown!r} is not a regular file", "not_a_file") from None
        if exc.errno == errno.ELOOP:
            raise Refused(
                f"{shown!r} is a link this service does not follow", "not_a_file"
            ) from None
        if exc.errno == errno.EISDIR:
            raise Refused(f"{shown!r} is a directory", "is_a_directory") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Refused(f"{shown!r} is a directory", "is_a_directory")
        raise Refused(f"{shown!r} is not a regular file", "not_a_file")
    os.set_blocking(fd, True)
    return fd


def exists(ws: Workspace, rel: str, shown: str) -> bool:
    try:
        os.close(ws.open(rel, os.O_PATH, shown))
    except FileNotFoundError:
        return False
    return True


def make_dirs(ws: Workspace, rel: str, shown: str) -> list[str]:
    """Create the directory `rel` and those above it, one at a time, each beneath
    the root; returns those it created, outermost first."""
    if rel == "." or exists(ws, rel, shown):
        return []
    made: list[str] = []
    done = ""
    for part in rel.split("/"):
        directory = ws.open(done or ".", os.O_RDONLY | os.O_DIRECTORY, shown)
        try:
            os.mkdir(part, 0o755, dir_fd=directory)
            made.append(os.path.join(done, part) if done else part)
        except FileExistsError:
            pass
        except NotADirectoryError:
            raise Refused(f"{done!r} is not a directory", "not_a_directory") from None
        finally:
            os.close(directory)
        done = os.path.join(done, part) if done else part
    return made


def remove_made(ws: Workspace, made: list[str]) -> None:
    """Undo `make_dirs` after a failure: remove what it created, if still empty."""
    for rel in reversed(made):
        parent, name = os.path.split(rel)
        try:
            directory = ws.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY, rel)
        except (OSError, Refused):
            return
        try:
            os.rmdir(name, dir_fd=directory)
        except OSError:
            return
        finally:
            os.close(directory)


def make_parents(ws: Workspace, rel: str, shown: str) -> list[str]:
    """Create the directories `rel` needs; returns those it created."""
    parent = os.path.dirname(rel)
    return make_dirs(ws, parent, shown) if parent else []


def read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def file_too_large(shown: str, limit: int) -> Refused:
    return Refused(f"{shown!r} is larger than {limit} bytes", "too_large")


_CODES = {
    errno.ENOENT: "not_found",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.ENOTEMPTY: "not_empty",
    errno.EEXIST: "exists",
    errno.EDQUOT: "quota",
    errno.ENOSPC: "no_space",
    errno.EFBIG: "too_large",
    errno.EACCES: "denied",
    errno.EPERM: "denied",
    errno.ENAMETOOLONG: "invalid_path",
    errno.ELOOP: "invalid_path",
}


def os_error_reply(ws: Workspace, exc: OSError) -> dict[str, Any]:
    """An OSError as a refusal: its reason, with a workspace-relative path at most."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.EDQUOT:
        reason = "the sandbox's disk quota is exhausted (Disk quota exceeded)"
    elif exc.errno == errno.ENOSPC:
        reason = "no space left on the sandbox's disk"
    elif exc.errno == errno.EFBIG:
        reason = "the file is larger than the sandbox's file size limit (File too large)"
    name = exc.filename
    if isinstance(name, str) and (name == ws.root or name.startswith(ws.root + "/")):
        reason = f"{os.path.relpath(name, ws.root)}: {reason}"
    return {"ok": False, "error": reason, "code": _CODES.get(exc.errno or 0, "io")}
