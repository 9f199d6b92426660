"""File tools: read, write, edit and list files inside the sandbox workspace.

Every path is resolved (symlinks included) and must land inside the workspace;
`..`, absolute paths elsewhere and links that lead out are refused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from worker.isolation import own_path
from worker.tools.base import ToolContext, ToolOutcome, make_tool, truncate

_MAX_READ_BYTES = 10 * 1024 * 1024
_MAX_LISTED = 1000


class PathError(Exception):
    pass


def resolve_in_workspace(workspace: Path, path: str) -> Path:
    """The real path of `path` inside the workspace, or PathError."""
    if "\x00" in path:
        raise PathError("path contains a NUL byte")
    root = workspace.resolve()
    candidate = Path(path)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise PathError(f"{path!r} is outside the sandbox workspace")
    return resolved


def _refuse_hard_links(target: Path) -> None:
    """A second name for a file may be a file outside the workspace: never write through it."""
    if target.exists() and target.stat().st_nlink > 1:
        raise PathError(f"{target.name!r} has other hard links; refusing to write through it")


def _relative(workspace: Path, path: Path) -> str:
    return str(path.relative_to(workspace.resolve())) or "."


Path_ = Annotated[str, msgspec.Meta(min_length=1, description="path relative to the workspace")]


class ReadFileInput(msgspec.Struct, forbid_unknown_fields=True):
    path: Path_
    start_line: Annotated[int, msgspec.Meta(ge=1, description="first line, 1-based")] | None = None
    end_line: Annotated[int, msgspec.Meta(ge=1, description="last line, inclusive")] | None = None


class WriteFileInput(msgspec.Struct, forbid_unknown_fields=True):
    path: Path_
    content: str


class EditFileInput(msgspec.Struct, forbid_unknown_fields=True):
    path: Path_
    old: Annotated[str, msgspec.Meta(min_length=1, description="exact text to replace, once")]
    new: str


class ListFilesInput(msgspec.Struct, forbid_unknown_fields=True):
    path: Annotated[str, msgspec.Meta(description="directory relative to the workspace")] = "."
    glob: Annotated[str, msgspec.Meta(description="pattern such as **/*.py")] | None = None


def _read(ctx: ToolContext, args: ReadFileInput) -> ToolOutcome:
    target = resolve_in_workspace(ctx.workspace, args.path)
    if not target.is_file():
        return ToolOutcome(f"no file at {args.path!r}", True)
    if target.stat().st_size > _MAX_READ_BYTES:
        return ToolOutcome(f"{args.path!r} is larger than {_MAX_READ_BYTES} bytes", True)
    text = target.read_text(errors="replace")
    if args.start_line is not None or args.end_line is not None:
        lines = text.splitlines(keepends=True)
        start = (args.start_line or 1) - 1
        end = args.end_line or len(lines)
        if start >= len(lines) or end < start + 1:
            return ToolOutcome(f"{args.path!r} has {len(lines)} lines; that range is empty", True)
        text = "".join(lines[start:end])
    return ToolOutcome(truncate(text, ctx.output_cap), False)


def _write(ctx: ToolContext, args: WriteFileInput) -> ToolOutcome:
    target = resolve_in_workspace(ctx.workspace, args.path)
    if target.is_dir():
        return ToolOutcome(f"{args.path!r} is a directory", True)
    _refuse_hard_links(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = args.content.encode()
    # O_NOFOLLOW: a link put in place after the check above is not followed out.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    own_path(ctx.isolation, target, ctx.sandbox_id, ctx.workspace)
    return ToolOutcome(f"wrote {len(data)} bytes to {_relative(ctx.workspace, target)}", False)


def _edit(ctx: ToolContext, args: EditFileInput) -> ToolOutcome:
    target = resolve_in_workspace(ctx.workspace, args.path)
    if not target.is_file():
        return ToolOutcome(f"no file at {args.path!r}", True)
    _refuse_hard_links(target)
    text = target.read_text()
    count = text.count(args.old)
    if count == 0:
        return ToolOutcome(f"`old` does not occur in {args.path!r}; read the file first", True)
    if count > 1:
        return ToolOutcome(
            f"`old` occurs {count} times in {args.path!r}; include more context to make it unique",
            True,
        )
    target.write_text(text.replace(args.old, args.new, 1))
    own_path(ctx.isolation, target, ctx.sandbox_id, ctx.workspace)
    return ToolOutcome(f"edited {_relative(ctx.workspace, target)}", False)


def _list(ctx: ToolContext, args: ListFilesInput) -> ToolOutcome:
    base = resolve_in_workspace(ctx.workspace, args.path)
    if not base.is_dir():
        return ToolOutcome(f"no directory at {args.path!r}", True)
    root = ctx.workspace.resolve()
    found = base.glob(args.glob) if args.glob else base.iterdir()
    names: list[str] = []
    for entry in found:
        if not entry.resolve().is_relative_to(root):
            continue  # a link that leads out is not shown
        names.append(_relative(ctx.workspace, entry) + ("/" if entry.is_dir() else ""))
        if len(names) > _MAX_LISTED:
            break
    names.sort()
    more = len(names) > _MAX_LISTED
    text = "\n".join(names[:_MAX_LISTED]) or "(empty)"
    if more:
        text += f"\n[listing stopped at {_MAX_LISTED} entries]"
    return ToolOutcome(text, False)


def _in_thread(
    func: Callable[[ToolContext, Any], ToolOutcome],
) -> Callable[[ToolContext, Any], Awaitable[ToolOutcome]]:
    """Run a blocking file operation off the event loop, failures as error outcomes."""

    async def run(ctx: ToolContext, args: Any) -> ToolOutcome:
        try:
            return await asyncio.to_thread(func, ctx, args)
        except PathError as exc:
            return ToolOutcome(str(exc), True)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            return ToolOutcome(f"{type(exc).__name__}: {exc}", True)

    return run


READ_FILE = make_tool(
    "read_file",
    "Read a text file in the workspace, optionally only lines start_line..end_line.",
    ReadFileInput,
    _in_thread(_read),
)
WRITE_FILE = make_tool(
    "write_file",
    "Create or overwrite a file in the workspace with the given content.",
    WriteFileInput,
    _in_thread(_write),
)
EDIT_FILE = make_tool(
    "edit_file",
    "Replace the one exact occurrence of `old` with `new` in a file of the workspace.",
    EditFileInput,
    _in_thread(_edit),
)
LIST_FILES = make_tool(
    "list_files",
    "List a directory of the workspace, or the files matching a glob under it.",
    ListFilesInput,
    _in_thread(_list),
)
