"""Extracting an archive (tar, tar.gz, tar.bz2, tar.xz or zip) into a directory of
the workspace: all of it, or nothing.

Entries are written into a fresh staging directory inside the target, and moved
into the target only once every entry was written and checked; any refusal
removes the staging directory, so a refused archive leaves nothing behind.

What each entry must satisfy, beyond what `tarfile.data_filter` checks (it is
applied too, for tar):
- its name is relative, has no `..` component, no NUL, at most 64 components
  of at most 255 bytes (`data_filter` strips a leading `/` instead of refusing,
  and zipfile rewrites bad names silently: an archive naming such paths is
  refused here, naming the entry);
- it is a file, a directory, a symlink or (tar) a hard link: devices, FIFOs and
  sockets are refused, in zip archives too, which `zipfile` would write as
  plain files;
- it is written with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) below the
  staging directory, so no entry is ever written through a link, whatever
  links earlier entries made (`data_filter` judges links by `realpath` on the
  names, which chains of links and over-long paths have fooled);
- a symlink's target, read lexically from where the link sits, stays inside
  the target directory, and once everything is written each link is resolved
  by the kernel beneath the staging directory: one that leads out of it (an
  earlier link making `..` go elsewhere than it reads) or loops is refused;
- a hard link names an earlier regular file of the same archive, linked by
  descriptor, never by a path that could be swapped;
- the number of entries, the bytes written, the size of the archive itself and
  the time taken are capped, and the sandbox's quota applies throughout.
Modes keep the owner's execute bit only (no setuid, setgid or sticky bits, no
group or other write); owners are the sandbox's own uid, as for everything it writes.
"""

from __future__ import annotations

import contextlib
import errno
import lzma
import os
import secrets
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from .frames import DataIn, Frames
from .paths import (
    Refused,
    Workspace,
    make_dirs,
    open_beneath,
    open_no_symlinks,
    remove_made,
    write_all,
)
from .transfer import temporary_file

MAX_DEPTH = 64
MAX_LINK_TARGET = 4095
_COPY_CHUNK = 1 << 20
_STAGING_PREFIX = ".sandstream-extract-"
_ZIP_UNIX = 3


class Limits:
    def __init__(self, request: dict[str, Any]) -> None:
        self.entries = int(request["max_entries"])
        self.bytes = int(request["max_bytes"])
        self.archive_bytes = int(request["max_archive_bytes"])
        self.deadline = time.monotonic() + float(request["max_seconds"])


class Entry:
    """One archive member, as this module understands it."""

    def __init__(
        self,
        name: str,
        parts: tuple[str, ...],
        kind: str,
        *,
        mode: int | None = None,
        mtime: float | None = None,
        target: str = "",
        source: IO[bytes] | None = None,
    ) -> None:
        self.name = name
        self.parts = parts
        self.kind = kind  # file, dir, symlink, hardlink
        self.mode = mode
        self.mtime = mtime
        self.target = target
        self.source = source


def refuse(entry: str, why: str, code: str = "entry_refused") -> Refused:
    return Refused(f"archive entry {entry[:300]!r} {why}", code, entry=entry[:1000])


def entry_parts(name: str) -> tuple[str, ...]:
    """The path components of an entry's name; refuses names that are absolute,
    climb with `..`, hold a NUL or are too deep or too long."""
    if "\x00" in name:
        raise refuse(name, "has a NUL byte in its name")
    if name.startswith("/"):
        raise refuse(name, "has an absolute name")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise refuse(name, "has a '..' component in its name")
    if len(parts) > MAX_DEPTH:
        raise refuse(name, f"is nested more than {MAX_DEPTH} directories deep")
    if any(len(os.fsencode(p)) > 255 for p in parts):
        raise refuse(name, "has a name component longer than 255 bytes")
    return parts


def link_stays_inside(parts: tuple[str, ...], target: str) -> bool:
    """Whether a symlink at `parts` pointing to `target` leads, read lexically,
    somewhere inside the extraction's root."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    where = list(parts[:-1])
    for component in target.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            if not where:
                return False
            where.pop()
        else:
            where.append(component)
    return True


def _timestamp(value: float | int | None) -> float | None:
    """An entry's modification time, if it is one a file can have."""
    if not value or not 0 < value < 1 << 33:
        return None
    return float(value)


def _safe_mode(mode: int) -> int:
    """A file's mode as `data_filter` would keep it: owner read-write, execute
    only if the owner had it, no group or other write, no special bits."""
    mode &= 0o755
    if not mode & 0o100:
        mode &= ~0o111
    return mode | 0o600


# ---- reading archives ------------------------------------------------------------------


_FILTER_REASONS = {
    tarfile.AbsolutePathError: "has an absolute name",
    tarfile.OutsideDestinationError: "would be written outside the target directory",
    tarfile.SpecialFileError: "is a device, FIFO or other special file",
    tarfile.AbsoluteLinkError: "is a link to an absolute path",
    tarfile.LinkOutsideDestinationError: "is a link leading outside the target directory",
}


def _tar_entry(archive: tarfile.TarFile, member: tarfile.TarInfo, staging: str) -> Entry | None:
    name = member.name
    parts = entry_parts(name)
    if not parts:
        return None  # the archive's root directory itself
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise refuse(name, "is a device, FIFO or other special file")
    if member.issym() and not link_stays_inside(parts, member.linkname):
        raise refuse(name, "is a symlink leading outside the target directory")
    target_parts: tuple[str, ...] = ()
    if member.islnk():
        try:
            target_parts = entry_parts(member.linkname)
        except Refused:
            target_parts = ()
        if not target_parts:
            raise refuse(name, f"is a hard link to {member.linkname[:300]!r}, not a file it holds")
    try:
        member = tarfile.data_filter(member, staging)
    except tarfile.FilterError as exc:
        reason = _FILTER_REASONS.get(type(exc), "was refused by tarfile's data filter")
        raise refuse(name, reason) from None
    mtime = _timestamp(member.mtime)
    if member.isreg():
        return Entry(
            name,
            parts,
            "file",
            mode=member.mode,
            mtime=mtime,
            source=archive.extractfile(member),
        )
    if member.isdir():
        return Entry(name, parts, "dir")
    if member.issym():
        return Entry(name, parts, "symlink", target=member.linkname)
    return Entry(name, parts, "hardlink", target="/".join(target_parts))


def _tar_entries(data: DataIn, staging: str) -> Iterator[Entry]:
    with tarfile.open(fileobj=data, mode="r|*") as archive:  # type: ignore[call-overload]
        while (member := archive.next()) is not None:
            archive.members.clear()  # a stream's members are not needed again
            entry = _tar_entry(archive, member, staging)
            if entry is not None:
                yield entry


def _zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Entry | None:
    name = info.filename
    parts = entry_parts(name)
    if not parts:
        return None
    mode = info.external_attr >> 16 if info.create_system == _ZIP_UNIX else 0
    kind = stat.S_IFMT(mode)
    try:
        mtime = _timestamp(time.mktime((*info.date_time, 0, 0, -1)))
    except (OverflowError, ValueError):
        mtime = None
    if info.is_dir() or kind == stat.S_IFDIR:
        return Entry(name, parts, "dir")
    if kind == stat.S_IFLNK:
        if info.file_size > MAX_LINK_TARGET:
            raise refuse(name, "is a symlink with an over-long target")
        target = os.fsdecode(archive.read(info))
        if not link_stays_inside(parts, target):
            raise refuse(name, "is a symlink leading outside the target directory")
        return Entry(name, parts, "symlink", target=target)
    if kind not in (0, stat.S_IFREG):
        raise refuse(name, "is a device, FIFO or other special file")
    perm = _safe_mode(stat.S_IMODE(mode)) if stat.S_IMODE(mode) else 0o644
    return Entry(name, parts, "file", mode=perm, mtime=mtime, source=archive.open(info))


def _zip_entries(data: DataIn, dest: int, limits: Limits) -> Iterator[Entry]:
    """A zip file's directory is at its end: it is spooled to an unnamed file in
    the target directory first (the quota counts it) and read from there."""
    fd, named = temporary_file(dest, os.O_RDWR)
    if named is not None:
        os.unlink(named, dir_fd=dest)  # kept open, gone from view
    with os.fdopen(fd, "w+b") as spool:
        for chunk in data.chunks():
            spool.write(chunk)
        spool.seek(0)
        with zipfile.ZipFile(spool) as archive:
            infos = archive.infolist()
            if len(infos) > limits.entries:
                raise Refused(
                    f"the archive has {len(infos)} entries; at most {limits.entries} are taken",
                    "archive_too_large",
                )
            for info in infos:
                entry = _zip_entry(archive, info)
                if entry is not None:
                    yield entry


# ---- writing entries ----------------------------------------------------------------------


class _Writer:
    """Writes entries below the staging directory, never through a link."""

    def __init__(self, staging: int, limits: Limits) -> None:
        self.staging = staging
        self.limits = limits
        self.entries = 0
        self.bytes = 0
        self.links: list[Entry] = []
        self._parent: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def add(self, entry: Entry) -> None:
        self.entries += 1
        if self.entries > self.limits.entries:
            raise refuse(
                entry.name,
                f"is past the limit of {self.limits.entries} entries",
                "archive_too_large",
            )
        self._in_time(entry)
        parent = self._directory(entry.parts[:-1], entry)
        name = entry.parts[-1]
        try:
            if entry.kind == "dir":
                self._mkdir(parent, name, entry)
            elif entry.kind == "file":
                self._file(parent, name, entry)
            elif entry.kind == "symlink":
                os.symlink(entry.target, name, dir_fd=parent)
                self.links.append(entry)
            else:
                self._hardlink(parent, name, entry)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise refuse(entry.name, "conflicts with an earlier entry of the archive") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refuse(entry.name, "conflicts with an earlier link of the archive") from None
            raise

    def _in_time(self, entry: Entry) -> None:
        if time.monotonic() > self.limits.deadline:
            raise refuse(entry.name, "was reached when extraction ran out of time", "timeout")

    def _directory(self, parts: tuple[str, ...], entry: Entry) -> int:
        """The entry's parent directory below the staging directory, made as needed."""
        if self._parent is not None and self._parent[0] == parts:
            return self._parent[1]
        self.close()
        current = os.dup(self.staging)
        try:
            for part in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=current)
                following = open_no_symlinks(current, part, os.O_RDONLY | os.O_DIRECTORY)
                os.close(current)
                current = following
        except OSError as exc:
            os.close(current)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
                raise refuse(
                    entry.name, "would be written through a link or a file of the archive"
                ) from None
            raise
        self._parent = (parts, current)
        return current

    def _mkdir(self, parent: int, name: str, entry: Entry) -> None:
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise

    def _file(self, parent: int, name: str, entry: Entry) -> None:
        assert entry.source is not None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = open_no_symlinks(parent, name, flags, 0o600)
        try:
            while chunk := entry.source.read(_COPY_CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.limits.bytes:
                    raise refuse(
                        entry.name,
                        f"takes the archive past {self.limits.bytes} bytes unpacked",
                        "archive_too_large",
                    )
                self._in_time(entry)
                write_all(fd, chunk)
            os.fchmod(fd, entry.mode if entry.mode is not None else 0o644)
            if entry.mtime is not None:
                os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, name: str, entry: Entry) -> None:
        try:
            source = open_no_symlinks(self.staging, entry.target, os.O_PATH)
        except OSError:
            raise refuse(entry.name, "is a hard link to no earlier file of the archive") from None
        try:
            if not stat.S_ISREG(os.fstat(source).st_mode):
                raise refuse(entry.name, "is a hard link to something other than a file")
            os.link(f"/proc/self/fd/{source}", name, dst_dir_fd=parent, follow_symlinks=True)
        finally:
            os.close(source)

    def check_links(self) -> None:
        """Resolve every symlink the archive made, beneath the staging directory."""
        for entry in self.links:
            try:
                os.close(open_beneath(self.staging, "/".join(entry.parts), os.O_PATH))
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise refuse(
                        entry.name, "is a symlink leading outside the target directory"
                    ) from None
                if exc.errno == errno.ELOOP:
                    raise refuse(entry.name, "is a symlink in a loop of links") from None
                # dangling (ENOENT, ENOTDIR): allowed, as tar allows it


# ---- moving into place ---------------------------------------------------------------------


def _merge(source: int, target: int, prefix: tuple[str, ...], move: bool) -> None:
    """Move what `source` holds into `target`: a name `target` lacks moves whole;
    a directory in both is merged; a file or link replaces one. A directory
    meeting a non-directory is a conflict. With `move` false, only check."""
    for name in sorted(os.listdir(source)):
        here = (*prefix, name)
        mine = os.stat(name, dir_fd=source, follow_symlinks=False)
        try:
            theirs = os.stat(name, dir_fd=target, follow_symlinks=False)
        except FileNotFoundError:
            theirs = None
        if theirs is not None and stat.S_ISDIR(mine.st_mode) and stat.S_ISDIR(theirs.st_mode):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            inner_source = os.open(name, flags, dir_fd=source)
            try:
                inner_target = os.open(name, flags, dir_fd=target)
                try:
                    _merge(inner_source, inner_target, here, move)
                finally:
                    os.close(inner_target)
            finally:
                os.close(inner_source)
            continue
        if theirs is not None and (stat.S_ISDIR(mine.st_mode) or stat.S_ISDIR(theirs.st_mode)):
            shown = "/".join(here)
            raise Refused(
                f"archive entry {shown!r} is a directory where the target has a file, or the "
                "other way round",
                "conflict",
                entry=shown,
            )
        if move:
            os.rename(name, name, src_dir_fd=source, dst_dir_fd=target)


def _extract(
    ws: Workspace, rel: str, dest: int, staging_name: str, limits: Limits, frames: Frames
) -> dict[str, Any]:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    staging = os.open(staging_name, flags, dir_fd=dest)
    writer = _Writer(staging, limits)
    try:
        frames.write_json({"ok": True, "ready": True})
        data = frames.data_in(limits.archive_bytes)
        # `data_filter` judges names against this path (realpath on it).
        staging_path = os.path.join(ws.root, rel, staging_name)
        try:
            if data.peek(4)[:2] == b"PK":
                entries = _zip_entries(data, dest, limits)
            else:
                entries = _tar_entries(data, staging_path)
            for entry in entries:
                writer.add(entry)
        except _UNREADABLE as exc:
            raise Refused(f"the archive cannot be read ({exc})", "invalid_archive") from None
        data.drain()
        writer.check_links()
        _merge(staging, dest, (), move=False)
        _merge(staging, dest, (), move=True)
    finally:
        writer.close()
        os.close(staging)
    return {"ok": True, "path": rel, "entries": writer.entries, "bytes": writer.bytes}


# What reading a broken archive raises (zipfile: RuntimeError for an encrypted
# entry, NotImplementedError for an unknown compression).
_UNREADABLE = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    NotImplementedError,
    RuntimeError,
)


def unpack(ws: Workspace, request: dict[str, Any], frames: Frames) -> dict[str, Any]:
    shown = str(request["path"])
    rel = ws.relative(shown)
    limits = Limits(request)
    made = make_dirs(ws, rel, shown)
    try:
        dest = ws.open_dir(rel, shown)
        try:
            staging_name = _STAGING_PREFIX + secrets.token_hex(8)
            os.mkdir(staging_name, 0o700, dir_fd=dest)
            try:
                return _extract(ws, rel, dest, staging_name, limits, frames)
            finally:
                with contextlib.suppress(OSError):
                    shutil.rmtree(staging_name, dir_fd=dest)
        finally:
            os.close(dest)
    except BaseException:
        remove_made(ws, made)  # a refused archive leaves no trace, not even its directory
        raise
