"""A directory of the workspace streamed out as an archive: tar, tar.gz or zip.

The archive is written straight into data frames as it is made; no file of it
is ever held whole. Links are stored as links, never followed (a link to
`/etc/passwd` goes out as a link, not as the host's file), and FIFOs, sockets
and devices are left out. The directory is counted first, so one holding more
entries than allowed is refused before a byte goes out.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import time
import zipfile
from typing import Any

from .frames import CHUNK, Frames
from .paths import Refused, Workspace
from .walk import Budget, Found, walk_sorted

MAX_DEPTH = 64
_COPY_CHUNK = 1 << 20
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class _Out:
    """Bytes written become data frames, CHUNK at a time. It has no `tell`:
    zipfile then writes a stream (sizes after each member's data)."""

    def __init__(self, frames: Frames) -> None:
        self._frames = frames
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._frames.write_data(bytes(self._buffer))
            self._buffer.clear()


class _Exact:
    """Exactly `size` bytes of a file: a file that shrank since its stat is
    padded with zeros, one that grew is cut, so the archive stays well-formed."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._left = size

    def read(self, size: int = -1) -> bytes:
        wanted = self._left if size < 0 else min(size, self._left)
        parts: list[bytes] = []
        got = 0
        while got < wanted:
            chunk = os.read(self._fd, wanted - got)
            if not chunk:
                parts.append(b"\0" * (wanted - got))
                break
            parts.append(chunk)
            got += len(chunk)
        self._left -= wanted
        return b"".join(parts)


def _open_file(found: Found) -> tuple[int, os.stat_result] | None:
    """The entry's file, if it still is a regular file (never blocking on a FIFO
    swapped in meanwhile, never following a link)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(found.name, flags, dir_fd=found.dirfd)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd, info


def _write_tar(top: int, out: Any, budget: Budget) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        archive.copybufsize = _COPY_CHUNK  # type: ignore[attr-defined]
        for found in walk_sorted(top, budget, MAX_DEPTH):
            info = tarfile.TarInfo("/".join(found.parts))
            info.mtime = int(found.info.st_mtime)
            info.mode = stat.S_IMODE(found.info.st_mode)
            kind = found.info.st_mode
            if stat.S_ISDIR(kind):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif stat.S_ISLNK(kind):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(found.name, dir_fd=found.dirfd)
                archive.addfile(info)
            elif stat.S_ISREG(kind) and (opened := _open_file(found)) is not None:
                fd, current = opened
                try:
                    info.size = current.st_size
                    archive.addfile(info, _Exact(fd, current.st_size))
                finally:
                    os.close(fd)


def _zip_time(seconds: float) -> tuple[int, int, int, int, int, int]:
    moment = time.localtime(seconds)[:6]
    return max(moment, _ZIP_EPOCH)  # zip cannot say a time before 1980


def _write_zip(top: int, out: Any, budget: Budget) -> None:
    with zipfile.ZipFile(
        out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6, allowZip64=True
    ) as archive:
        for found in walk_sorted(top, budget, MAX_DEPTH):
            name = "/".join(found.parts)
            try:
                name.encode()
            except UnicodeEncodeError:
                continue  # zip names are UTF-8; a name that is not cannot be stored
            kind, mode = found.info.st_mode, stat.S_IMODE(found.info.st_mode)
            moment = _zip_time(found.info.st_mtime)
            if stat.S_ISDIR(kind):
                entry = zipfile.ZipInfo(name + "/", moment)
                entry.external_attr = (stat.S_IFDIR | mode) << 16 | 0x10
                archive.writestr(entry, b"")
            elif stat.S_ISLNK(kind):
                entry = zipfile.ZipInfo(name, moment)
                entry.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(entry, os.fsencode(os.readlink(found.name, dir_fd=found.dirfd)))
            elif stat.S_ISREG(kind) and (opened := _open_file(found)) is not None:
                fd, current = opened
                try:
                    entry = zipfile.ZipInfo(name, moment)
                    entry.external_attr = (stat.S_IFREG | mode) << 16
                    entry.compress_type = zipfile.ZIP_DEFLATED
                    entry.file_size = current.st_size
                    large = current.st_size > zipfile.ZIP64_LIMIT // 2
                    source = _Exact(fd, current.st_size)
                    with archive.open(entry, "w", force_zip64=large) as member:
                        while chunk := source.read(_COPY_CHUNK):
                            member.write(chunk)
                finally:
                    os.close(fd)


def pack(ws: Workspace, request: dict[str, Any], frames: Frames) -> None:
    shown = str(request["path"])
    rel = ws.relative(shown)
    form = str(request["format"])
    if form not in ("tar", "tar.gz", "zip"):
        raise Refused(f"unknown archive format {form!r}", "invalid_format")
    max_entries = int(request["max_entries"])
    top = ws.open_dir(rel, shown)
    try:
        counting = Budget(max_entries, float(request["max_seconds"]))
        count = sum(1 for _ in walk_sorted(top, counting, MAX_DEPTH))
        if counting.stopped is not None:
            raise Refused(
                f"{shown!r} is too large to archive (the count {counting.stopped})",
                "archive_too_large",
            )
        frames.write_json({"ok": True, "ready": True, "entries": count})
        out = _Out(frames)
        # Entries made while it is written may join it, up to the same bound.
        budget = Budget(max_entries, float("inf"))
        if form == "zip":
            _write_zip(top, out, budget)
        elif form == "tar":
            _write_tar(top, out, budget)
        else:
            with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as compressed:
                _write_tar(top, compressed, budget)
        out.flush()
        frames.write_end()
    finally:
        os.close(top)
