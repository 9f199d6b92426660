"""Archives for the tests: a small repository, and crafted ones with each kind of
entry an extraction must refuse."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

REPOSITORY = {
    "README.md": b"# demo\n",
    "src/app.py": b"print('hello')\n",
    "src/lib/util.py": b"def f():\n    return 1\n",
    "bin/run.sh": b"#!/bin/sh\necho run\n",
    "data/blob.bin": bytes(range(256)) * 64,
}


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_of(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.GNU_FORMAT) as archive:  # type: ignore[call-overload]
        for info, data in members:
            if data is not None:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def repository_tar(mode: str = "w:gz") -> bytes:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_member("repo", tarfile.DIRTYPE, mode=0o755), None)
    ]
    for name, data in REPOSITORY.items():
        executable = name.endswith(".sh")
        members.append((_member(f"repo/{name}", mode=0o755 if executable else 0o644), data))
    members.append((_member("repo/docs", tarfile.SYMTYPE, linkname="src"), None))
    return tar_of(members, mode)


def zip_of(entries: list[tuple[str, bytes, int]]) -> bytes:
    """Entries (name, data, unix mode with its file type bits, or 0)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name, (2024, 1, 2, 3, 4, 6))
            info.create_system = 3
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def repository_zip() -> bytes:
    entries = [(f"repo/{name}", data, stat.S_IFREG | 0o644) for name, data in REPOSITORY.items()]
    entries.append(("repo/docs", b"src", stat.S_IFLNK | 0o777))
    return zip_of(entries)


_OK = (_member("ok.txt"), b"fine\n")

# kind -> (archive, the entry it must be refused for)
CRAFTED: dict[str, tuple[bytes, str]] = {
    "tar: a '..' name": (tar_of([_OK, (_member("../escaped.txt"), b"x")]), "../escaped.txt"),
    "tar: a nested '..' name": (
        tar_of([_OK, (_member("sub/../../escaped.txt"), b"x")]),
        "sub/../../escaped.txt",
    ),
    "tar: an absolute name": (
        tar_of([_OK, (_member("/tmp/escaped.txt"), b"x")]),
        "/tmp/escaped.txt",
    ),
    "tar: a symlink to an absolute path": (
        tar_of([_OK, (_member("evil", tarfile.SYMTYPE, linkname="/etc/passwd"), None)]),
        "evil",
    ),
    "tar: a symlink climbing out": (
        tar_of([_OK, (_member("sub/evil", tarfile.SYMTYPE, linkname="../../outside"), None)]),
        "sub/evil",
    ),
    "tar: a symlink that climbs out through another link": (
        tar_of(
            [
                _OK,
                (_member("here", tarfile.SYMTYPE, linkname="."), None),
                (_member("evil", tarfile.SYMTYPE, linkname="here/.."), None),
            ]
        ),
        "evil",
    ),
    "tar: a file written through a link": (
        tar_of(
            [
                _OK,
                (_member("sub", tarfile.DIRTYPE), None),
                (_member("via", tarfile.SYMTYPE, linkname="sub"), None),
                (_member("via/payload.txt"), b"x"),
            ]
        ),
        "via/payload.txt",
    ),
    "tar: a hard link to an absolute path": (
        tar_of([_OK, (_member("hard", tarfile.LNKTYPE, linkname="/etc/passwd"), None)]),
        "hard",
    ),
    "tar: a hard link climbing out": (
        tar_of([_OK, (_member("hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)]),
        "hard",
    ),
    "tar: a character device": (
        tar_of([_OK, (_member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)]),
        "null",
    ),
    "tar: a block device": (
        tar_of([_OK, (_member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), None)]),
        "disk",
    ),
    "tar: a FIFO": (tar_of([_OK, (_member("pipe", tarfile.FIFOTYPE), None)]), "pipe"),
    "tar.gz: a '..' name": (
        tar_of([_OK, (_member("../escaped.txt"), b"x")], "w:gz"),
        "../escaped.txt",
    ),
    "zip: a '..' name": (
        zip_of([("ok.txt", b"fine\n", 0), ("../escaped.txt", b"x", 0)]),
        "../escaped.txt",
    ),
    "zip: an absolute name": (
        zip_of([("ok.txt", b"fine\n", 0), ("/tmp/escaped.txt", b"x", 0)]),
        "/tmp/escaped.txt",
    ),
    "zip: a symlink to an absolute path": (
        zip_of([("ok.txt", b"fine\n", 0), ("evil", b"/etc/passwd", stat.S_IFLNK | 0o777)]),
        "evil",
    ),
    "zip: a symlink climbing out": (
        zip_of([("ok.txt", b"fine\n", 0), ("evil", b"../../x", stat.S_IFLNK | 0o777)]),
        "evil",
    ),
    "zip: a symlink that climbs out through another link": (
        zip_of(
            [
                ("ok.txt", b"fine\n", 0),
                ("here", b".", stat.S_IFLNK | 0o777),
                ("evil", b"here/..", stat.S_IFLNK | 0o777),
            ]
        ),
        "evil",
    ),
    "zip: a FIFO": (
        zip_of([("ok.txt", b"fine\n", 0), ("pipe", b"", stat.S_IFIFO | 0o644)]),
        "pipe",
    ),
}
