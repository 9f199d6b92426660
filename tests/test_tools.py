"""The file tools: what they do, and the paths they refuse."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from worker.isolation import Isolation
from worker.tools import TOOLS, ToolContext, ToolOutcome, execute_tool


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    return root


def call(workspace: Path, name: str, **args: Any) -> ToolOutcome:
    ctx = ToolContext(
        workspace=workspace,
        timeout=5,
        output_cap=200,
        isolation=Isolation(kind="none"),
        sandbox_id=str(uuid.uuid4()),
    )
    return asyncio.run(execute_tool(ctx, name, args, list(TOOLS)))


def test_write_read_edit_list_round_trip(workspace: Path) -> None:
    assert not call(
        workspace, "write_file", path="src/app.py", content="a = 1\nb = 2\nc = 3\n"
    ).is_error
    assert call(workspace, "read_file", path="src/app.py").content == "a = 1\nb = 2\nc = 3\n"
    assert call(workspace, "read_file", path="src/app.py", start_line=2, end_line=3).content == (
        "b = 2\nc = 3\n"
    )
    assert not call(workspace, "edit_file", path="src/app.py", old="b = 2", new="b = 20").is_error
    assert (workspace / "src/app.py").read_text() == "a = 1\nb = 20\nc = 3\n"
    assert call(workspace, "list_files").content == "src/"
    assert call(workspace, "list_files", path="src").content == "src/app.py"
    assert call(workspace, "list_files", glob="**/*.py").content == "src/app.py"


def test_edit_must_match_exactly_once(workspace: Path) -> None:
    (workspace / "f.txt").write_text("x x")
    twice = call(workspace, "edit_file", path="f.txt", old="x", new="y")
    assert twice.is_error and "2 times" in twice.content
    missing = call(workspace, "edit_file", path="f.txt", old="z", new="y")
    assert missing.is_error and "does not occur" in missing.content
    assert (workspace / "f.txt").read_text() == "x x"


def test_read_output_is_capped_with_a_marker(workspace: Path) -> None:
    (workspace / "big.txt").write_text("z" * 1000)
    outcome = call(workspace, "read_file", path="big.txt")
    assert outcome.content.startswith("z" * 200)
    assert "[output truncated: 800 more bytes not shown]" in outcome.content


def test_missing_file_is_an_error_result(workspace: Path) -> None:
    outcome = call(workspace, "read_file", path="nope.txt")
    assert outcome.is_error and "no file" in outcome.content


@pytest.mark.parametrize(
    "path", ["../outside.txt", "a/../../outside.txt", "/etc/passwd", "/tmp/x", "link/secret"]
)
def test_paths_outside_the_workspace_are_refused(workspace: Path, path: str) -> None:
    outside = workspace.parent / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s3cret")
    (workspace / "link").symlink_to(outside)
    for name, args in [
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "pwned"}),
        ("edit_file", {"path": path, "old": "s3cret", "new": "pwned"}),
        ("list_files", {"path": path}),
    ]:
        outcome = call(workspace, name, **args)
        assert outcome.is_error and "outside the sandbox workspace" in outcome.content, name
    assert (outside / "secret").read_text() == "s3cret"
    assert not (workspace.parent / "outside.txt").exists()


def test_symlinked_file_leading_out_is_refused(workspace: Path) -> None:
    target = workspace.parent / "host-file"
    target.write_text("host")
    os.symlink(target, workspace / "innocent.txt")
    assert call(workspace, "read_file", path="innocent.txt").is_error
    assert call(workspace, "write_file", path="innocent.txt", content="x").is_error
    assert target.read_text() == "host"
    assert call(workspace, "list_files").content == "(empty)"


def test_absolute_path_inside_the_workspace_is_allowed(workspace: Path) -> None:
    (workspace / "in.txt").write_text("inside")
    assert call(workspace, "read_file", path=str(workspace / "in.txt")).content == "inside"
