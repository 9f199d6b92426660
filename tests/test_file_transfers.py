"""The file service's transfers, with and without bubblewrap (`box`): what the
files API and `files_changed` are built on, checked without the HTTP layer."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import pytest
from archives import CRAFTED, REPOSITORY, repository_tar, repository_zip, tar_of
from helpers import Box

from shared.sandbox import transfers
from shared.sandbox.files import FileRefused
from shared.sandbox.handle import OpenSandbox

LIMITS = transfers.ArchiveLimits(entries=1000, bytes=10 << 20, archive_bytes=10 << 20, seconds=30)


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def upload(box: Box, path: str, data: bytes, **conditions: Any) -> transfers.Written:
    async def work(sandbox: OpenSandbox) -> transfers.Written:
        async with sandbox.files.channel() as channel:
            return await transfers.upload(
                channel, path, _chunks(data), max_bytes=1 << 30, **conditions
            )

    return box.call(work)


def download(box: Box, path: str, offset: int = 0, length: int = -1) -> tuple[Any, bytes]:
    async def work(sandbox: OpenSandbox) -> tuple[Any, bytes]:
        async with sandbox.files.channel() as channel:
            head = await transfers.open_path(channel, path, None)
            if isinstance(head, transfers.DirHead):
                return head, b""
            size = head.size - offset if length < 0 else length
            body = b"".join([c async for c in transfers.read_range(channel, offset, size)])
            return head, body

    return box.call(work)


def extract(box: Box, path: str, archive: bytes, limits: transfers.ArchiveLimits = LIMITS) -> Any:
    async def work(sandbox: OpenSandbox) -> transfers.Unpacked:
        async with sandbox.files.channel() as channel:
            return await transfers.extract(channel, path, _chunks(archive, 1000), limits)

    return box.call(work)


def pack(box: Box, path: str, form: str) -> bytes:
    async def work(sandbox: OpenSandbox) -> bytes:
        async with sandbox.files.channel() as channel:
            stream = await transfers.pack(channel, path, form, max_entries=1000, max_seconds=10)
            return b"".join([c async for c in stream])

    return box.call(work)


def tree(root: str) -> set[str]:
    """Every path under `root`, relative, directories with a trailing slash."""
    found = set()
    for here, dirs, files in os.walk(root):
        rel = os.path.relpath(here, root)
        found |= {os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs}
        found |= {os.path.normpath(os.path.join(rel, f)) for f in files}
    return found


# ---- upload and download --------------------------------------------------------------------


def test_upload_then_download_is_byte_identical_and_owned_like_the_agents_files(box: Box) -> None:
    data = os.urandom(3 << 20) + b"\0\xff text\n"
    written = upload(box, "deep/er/blob.bin", data)
    assert written.created and written.size == len(data)
    assert written.sha256 == hashlib.sha256(data).hexdigest()
    head, body = download(box, "deep/er/blob.bin")
    assert body == data and head.sha256 == written.sha256
    owner = box.spec.uid if box.confinement.kind == "bubblewrap" else os.geteuid()
    for path in ("deep", "deep/er", "deep/er/blob.bin"):
        assert (box.workspace / path).stat().st_uid == owner
    assert download(box, "deep/er/blob.bin", 100, 50)[1] == data[100:150]


def test_a_replaced_file_keeps_its_mode_and_is_not_created(box: Box) -> None:
    script = box.put("run.sh", "old")
    script.chmod(0o755)
    written = upload(box, "run.sh", b"#!/bin/sh\n")
    assert not written.created and (script.stat().st_mode & 0o777) == 0o755
    assert script.read_bytes() == b"#!/bin/sh\n"


def test_preconditions_are_checked(box: Box) -> None:
    first = upload(box, "f.txt", b"one")
    with pytest.raises(FileRefused) as refused:
        upload(box, "f.txt", b"two", if_none_match="*")
    assert refused.value.code == "precondition_failed"
    with pytest.raises(FileRefused) as refused:
        upload(box, "f.txt", b"two", if_match=["0" * 64])
    assert refused.value.code == "precondition_failed"
    assert upload(box, "f.txt", b"two", if_match=[first.sha256]).size == 3
    with pytest.raises(FileRefused):
        upload(box, "absent.txt", b"x", if_match="*")
    assert (box.workspace / "f.txt").read_bytes() == b"two"
    assert not (box.workspace / "absent.txt").exists()


def test_an_upload_cut_off_leaves_nothing_behind(box: Box) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 100_000
        raise ConnectionResetError("the client went away")

    async def work(sandbox: OpenSandbox) -> None:
        async with sandbox.files.channel() as channel:
            await transfers.upload(channel, "new/partial.bin", broken(), max_bytes=1 << 20)

    with pytest.raises(ConnectionResetError):
        box.call(work)
    assert tree(str(box.workspace)) == set()


def test_an_upload_over_its_limit_is_refused_and_leaves_nothing(box: Box) -> None:
    async def work(sandbox: OpenSandbox) -> None:
        async with sandbox.files.channel() as channel:
            await transfers.upload(channel, "big.bin", _chunks(b"y" * 300_000), max_bytes=200_000)

    with pytest.raises(FileRefused) as refused:
        box.call(work)
    assert refused.value.code == "too_large"
    assert tree(str(box.workspace)) == set()


def test_downloads_never_follow_a_link_out_of_the_workspace(box: Box) -> None:
    (box.workspace / "out").symlink_to("/etc/passwd")
    (box.workspace / "in").symlink_to("real.txt")
    box.put("real.txt", "inside")
    with pytest.raises(FileRefused) as refused:
        download(box, "out")
    assert refused.value.code == "outside"
    assert download(box, "in")[1] == b"inside"


# ---- listing and removal --------------------------------------------------------------------


def _list(box: Box, path: str, recursive: bool, limit: int) -> list[list[str]]:
    """Every page of a listing, following its cursor."""

    async def work(sandbox: OpenSandbox) -> list[list[str]]:
        pages: list[list[str]] = []
        cursor = None
        async with sandbox.files.channel() as channel:
            while True:
                page = await transfers.list_dir(
                    channel,
                    path,
                    recursive=recursive,
                    limit=limit,
                    cursor=cursor,
                    max_examined=10_000,
                    max_seconds=5,
                )
                pages.append([f"{e.path}:{e.type}" for e in page.entries])
                if page.next is None:
                    return pages
                cursor = page.next

    return box.call(work)


def test_listings_page_through_a_tree_in_order_exactly_once(box: Box) -> None:
    for name in ("b/2.txt", "b/1.txt", "a.txt", "b/c/3.txt", "d/4.txt"):
        box.put(name, "x")
    (box.workspace / "link").symlink_to("/etc")
    pages = _list(box, ".", recursive=True, limit=3)
    flat = [entry for page in pages for entry in page]
    assert flat == [
        "a.txt:file",
        "b:dir",
        "b/1.txt:file",
        "b/2.txt:file",
        "b/c:dir",
        "b/c/3.txt:file",
        "d:dir",
        "d/4.txt:file",
        "link:symlink",
    ]
    assert all(len(page) <= 3 for page in pages)
    assert _list(box, "b", recursive=False, limit=10) == [
        ["b/1.txt:file", "b/2.txt:file", "b/c:dir"]
    ]


def test_removal_takes_links_not_their_targets_and_empty_directories_unless_recursive(
    box: Box,
) -> None:
    box.put("keep/target.txt", "keep")
    (box.workspace / "link").symlink_to("keep/target.txt")
    box.put("full/inner.txt", "x")

    def remove(path: str, recursive: bool = False) -> Any:
        async def work(sandbox: OpenSandbox) -> Any:
            async with sandbox.files.channel() as channel:
                return await transfers.remove(channel, path, recursive)

        return box.call(work)

    assert remove("link").type == "symlink"
    assert (box.workspace / "keep/target.txt").read_text() == "keep"
    with pytest.raises(FileRefused) as refused:
        remove("full")
    assert refused.value.code == "not_empty"
    assert remove("full", recursive=True).type == "dir"
    with pytest.raises(FileRefused) as refused:
        remove("full")
    assert refused.value.code == "not_found"
    assert tree(str(box.workspace)) == {"keep/", "keep/target.txt"}


# ---- archives -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tar", "tar.gz", "zip"])
def test_a_repository_archive_extracts_whole(box: Box, form: str) -> None:
    archive = (
        repository_zip() if form == "zip" else repository_tar("w:gz" if form == "tar.gz" else "w")
    )
    done = extract(box, "checkout", archive)
    assert done.entries >= len(REPOSITORY)
    for name, data in REPOSITORY.items():
        assert (box.workspace / "checkout/repo" / name).read_bytes() == data
    assert os.readlink(box.workspace / "checkout/repo/docs") == "src"
    assert os.access(box.workspace / "checkout/repo/bin/run.sh", os.X_OK) == (form != "zip")
    assert not any(".sandstream" in p for p in tree(str(box.workspace)))


def test_an_archive_merges_into_what_is_there(box: Box) -> None:
    box.put("checkout/repo/README.md", "old")
    box.put("checkout/repo/LOCAL.txt", "mine")
    extract(box, "checkout", repository_tar())
    assert (box.workspace / "checkout/repo/README.md").read_bytes() == REPOSITORY["README.md"]
    assert (box.workspace / "checkout/repo/LOCAL.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", sorted(CRAFTED))
def test_a_crafted_archive_is_refused_naming_its_entry_and_writes_nothing(
    box: Box, kind: str
) -> None:
    box.put("keep.txt", "keep")
    before = tree(str(box.workspace.parent))
    archive, entry = CRAFTED[kind]
    with pytest.raises(FileRefused) as refused:
        extract(box, "dest", archive)
    assert refused.value.code == "entry_refused", refused.value
    assert refused.value.entry == entry and repr(entry) in str(refused.value)
    assert tree(str(box.workspace.parent)) == before
    assert "/tmp" not in str(refused.value).replace("'/tmp/escaped.txt'", "")


def test_archive_caps_are_refused_and_leave_nothing(box: Box) -> None:
    many = tar_of([(tarfile.TarInfo(f"f{i}"), b"x") for i in range(20)])
    small = transfers.ArchiveLimits(entries=10, bytes=1 << 20, archive_bytes=1 << 20, seconds=30)
    with pytest.raises(FileRefused) as refused:
        extract(box, "dest", many, small)
    assert refused.value.code == "archive_too_large" and refused.value.entry == "f10"
    bomb = tar_of([(tarfile.TarInfo("zeros"), b"\0" * (2 << 20))], "w:gz")
    with pytest.raises(FileRefused) as refused:
        extract(box, "dest", bomb, small)
    assert refused.value.code == "archive_too_large" and refused.value.entry == "zeros"
    with pytest.raises(FileRefused) as refused:
        extract(box, "dest", b"this is no archive" * 100, small)
    assert refused.value.code == "invalid_archive"
    assert tree(str(box.workspace)) == set()


def test_timestamps_no_file_can_have_are_dropped_not_failed(box: Box) -> None:
    future = tarfile.TarInfo("future.txt")
    future.mtime = 1 << 40
    past = tarfile.TarInfo("past.txt")
    past.mtime = -5
    extract(box, ".", tar_of([(future, b"f"), (past, b"p")]))
    assert (box.workspace / "future.txt").read_bytes() == b"f"
    assert (box.workspace / "past.txt").read_bytes() == b"p"


def test_archives_out_keep_links_as_links_and_leave_special_files_out(box: Box) -> None:
    box.put("project/src/a.py", "a = 1\n")
    (box.workspace / "project/etc-link").symlink_to("/etc/passwd")
    os.mkfifo(box.workspace / "project/pipe")
    with tarfile.open(fileobj=io.BytesIO(pack(box, "project", "tar.gz"))) as tarred:
        members = {m.name: m for m in tarred.getmembers()}
        assert set(members) == {"src", "src/a.py", "etc-link"}
        assert members["etc-link"].issym() and members["etc-link"].linkname == "/etc/passwd"
        assert tarred.extractfile("src/a.py").read() == b"a = 1\n"  # type: ignore[union-attr]
    zipped = zipfile.ZipFile(io.BytesIO(pack(box, "project", "zip")))
    assert sorted(zipped.namelist()) == ["etc-link", "src/", "src/a.py"]
    assert zipped.read("etc-link") == b"/etc/passwd"  # the link's target, not the host's file


# ---- what changed ----------------------------------------------------------------------------


def test_changes_name_exactly_what_was_created_modified_and_deleted(box: Box) -> None:
    box.put("same.txt", "same")
    box.put("edit.txt", "before")
    box.put("gone/old.txt", "old")

    async def work(sandbox: OpenSandbox) -> transfers.Changes:
        limits: dict[str, Any] = {"max_entries": 10_000, "max_seconds": 5, "max_bytes": 1 << 20}
        async with sandbox.files.channel() as channel:
            before = await transfers.snapshot(channel, **limits)
        (box.workspace / "edit.txt").write_text("after, longer")
        (box.workspace / "gone/old.txt").unlink()
        (box.workspace / "gone").rmdir()
        box.put("new/made.txt", "new")
        async with sandbox.files.channel() as channel:
            return await transfers.changes(channel, before, max_changes=100, **limits)

    found = box.call(work)
    assert not found.truncated
    assert [(c.path, c.change, c.type, c.size) for c in found.changes] == [
        ("edit.txt", "modified", "file", 13),
        ("gone", "deleted", "dir", None),
        ("gone/old.txt", "deleted", "file", None),
        ("new", "created", "dir", 0),
        ("new/made.txt", "created", "file", 3),
    ]
