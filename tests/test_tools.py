"""The file tools: what they do, the paths they refuse, and the files they will
not block on, with and without bubblewrap (`box`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
from helpers import Box

from shared.sandbox.files import ListReply, ReadReply
from shared.sandbox.handle import OpenSandbox


def test_write_read_edit_list_round_trip(box: Box) -> None:
    written = box.tool("write_file", path="src/app.py", content="a = 1\nb = 2\nc = 3\n")
    assert not written.is_error and written.content == "wrote 18 bytes to src/app.py"
    assert box.tool("read_file", path="src/app.py").content == "a = 1\nb = 2\nc = 3\n"
    assert box.tool("read_file", path="src/app.py", start_line=2, end_line=3).content == (
        "b = 2\nc = 3\n"
    )
    assert not box.tool("edit_file", path="src/app.py", old="b = 2", new="b = 20").is_error
    assert (box.workspace / "src/app.py").read_text() == "a = 1\nb = 20\nc = 3\n"
    assert box.tool("list_files").content == "src/"
    assert box.tool("list_files", path="src").content == "src/app.py"
    assert box.tool("list_files", glob="**/*.py").content == "src/app.py"


def test_files_written_belong_to_the_sandbox(box: Box) -> None:
    box.tool("write_file", path="deep/er/f.txt", content="x")
    owner = box.spec.uid if box.confinement.kind == "bubblewrap" else os.geteuid()
    for path in ("deep", "deep/er", "deep/er/f.txt"):
        assert (box.workspace / path).stat().st_uid == owner


def test_edit_must_match_exactly_once(box: Box) -> None:
    box.put("f.txt", "x x")
    twice = box.tool("edit_file", path="f.txt", old="x", new="y")
    assert twice.is_error and "2 times" in twice.content
    missing = box.tool("edit_file", path="f.txt", old="z", new="y")
    assert missing.is_error and "does not occur" in missing.content
    assert (box.workspace / "f.txt").read_text() == "x x"


def test_read_output_is_capped_with_a_marker(box: Box) -> None:
    (box.workspace / "big.txt").write_text("z" * 1000)
    outcome = box.tool("read_file", path="big.txt")
    assert outcome.content.startswith("z" * 200)
    assert "[output truncated: 800 more bytes not shown]" in outcome.content


def test_read_and_edit_refuse_files_over_the_size_cap(box: Box) -> None:
    with box.put("huge.txt").open("wb") as handle:
        handle.truncate(11 * 1024 * 1024)
    for name, args in [("read_file", {}), ("edit_file", {"old": "a", "new": "b"})]:
        outcome = box.tool(name, path="huge.txt", **args)
        assert outcome.is_error and "larger than 10485760 bytes" in outcome.content, name


def test_missing_file_is_an_error_result(box: Box) -> None:
    outcome = box.tool("read_file", path="nope.txt")
    assert outcome.is_error and "no file" in outcome.content


@pytest.mark.parametrize(
    "path", ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "/tmp/x", "link/secret"]
)
def test_paths_outside_the_workspace_are_refused(box: Box, path: str) -> None:
    outside = box.workspace.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    (box.workspace / "link").symlink_to(outside)
    for name, args in [
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "pwned"}),
        ("edit_file", {"path": path, "old": "s3cret", "new": "pwned"}),
        ("list_files", {"path": path}),
    ]:
        outcome = box.tool(name, **args)
        assert outcome.is_error and "outside the sandbox workspace" in outcome.content, name
    assert (outside / "secret").read_text() == "s3cret"
    assert not (box.workspace.parent / "outside.txt").exists()


def test_symlinked_file_leading_out_is_refused(box: Box) -> None:
    target = box.workspace.parent / "host-file"
    target.write_text("host")
    os.symlink(target, box.workspace / "innocent.txt")
    assert box.tool("read_file", path="innocent.txt").is_error
    assert box.tool("write_file", path="innocent.txt", content="x").is_error
    assert target.read_text() == "host"
    assert box.tool("list_files").content == "(empty)"


def test_symlinks_inside_the_workspace_are_followed(box: Box) -> None:
    (box.workspace / "real").mkdir()
    (box.workspace / "real" / "f.txt").write_text("inside")
    os.symlink("real", box.workspace / "alias")
    assert box.tool("read_file", path="alias/f.txt").content == "inside"
    assert box.tool("list_files").content == "alias/\nreal/"


def test_absolute_path_inside_the_workspace_is_allowed(box: Box) -> None:
    (box.workspace / "in.txt").write_text("inside")
    assert box.tool("read_file", path=f"{box.inside}/in.txt").content == "inside"


def test_special_files_are_refused_without_blocking(box: Box) -> None:
    os.mkfifo(box.workspace / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    directory = os.open(box.workspace, os.O_RDONLY)
    try:
        listener.bind(f"/proc/self/fd/{directory}/sock")  # the workspace's path is too long
    finally:
        os.close(directory)
    if box.spec.uid is not None:  # as the agent would have made them
        for name in ("fifo", "sock"):
            os.chown(box.workspace / name, box.spec.uid, box.spec.uid)
    try:
        started = time.monotonic()
        for name in ("fifo", "sock"):
            for tool, args in [
                ("read_file", {}),
                ("write_file", {"content": "x"}),
                ("edit_file", {"old": "a", "new": "b"}),
            ]:
                outcome = box.tool(tool, path=name, **args)
                assert outcome.is_error and "not a regular file" in outcome.content, (tool, name)
        assert time.monotonic() - started < 10
    finally:
        listener.close()


def test_a_glob_over_symlink_loops_is_bounded(box: Box) -> None:
    for i in range(10):
        os.symlink(".", box.workspace / f"loop{i}")
    (box.workspace / "a.py").write_text("")
    started = time.monotonic()
    outcome = box.tool("list_files", glob="**/*.py")
    assert outcome.content == "a.py"
    assert time.monotonic() - started < 5


def test_a_glob_over_a_huge_tree_stops_and_says_so(box: Box) -> None:
    for i in range(3000):
        (box.workspace / f"f{i:04}.txt").touch()
    outcome = box.tool("list_files", glob="*.txt")
    assert not outcome.is_error
    assert outcome.content.count("\n") == 1000  # 1000 names, then the marker
    assert outcome.content.endswith("[listing stopped at 1000 entries]")


@pytest.mark.parametrize("glob", ["/etc/*", "../*", "a/../../*"])
def test_globs_that_leave_the_directory_are_refused(box: Box, glob: str) -> None:
    outcome = box.tool("list_files", glob=glob)
    assert outcome.is_error and "glob" in outcome.content


def test_errors_name_no_host_path(box: Box) -> None:
    (box.workspace / "ro").mkdir()
    (box.workspace / "ro" / "f").write_text("x")
    os.chmod(box.workspace / "ro", 0o500)
    outcome = box.tool("write_file", path="ro/new/deep.txt", content="x")
    assert str(box.workspace.parent) not in outcome.content


def test_cancelling_a_request_kills_the_file_service(box: Box) -> None:
    """An interrupt ends a file tool at once, and its process with it."""
    pids: list[int] = []

    async def work(sandbox: OpenSandbox) -> None:
        (box.workspace / "f").write_text("x")
        await sandbox.files.request(
            ReadReply, "read_text", path="f", max_bytes=10, max_file_bytes=10
        )
        proc = sandbox.files._proc
        assert proc is not None
        pids.append(proc.pid)
        # A walk of a big tree, cancelled while it runs.
        for i in range(20):
            (box.workspace / f"d{i}").mkdir()
        task = asyncio.create_task(
            sandbox.files.request(
                ListReply,
                "list",
                path=".",
                glob="**/*",
                max_entries=10**6,
                max_examined=10**9,
                max_seconds=60,
            )
        )
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert sandbox.files._proc is None

    box.call(work)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pids[0]}").exists()
