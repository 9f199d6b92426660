"""File tools: read, write, edit and list files inside the sandbox workspace.

Each call is a request to the sandbox's file service (`shared.sandbox.files`),
which runs inside the sandbox with its uid: the kernel decides what a path can
reach. The service keeps paths inside the workspace, refuses special files
without blocking on them, and bounds every walk.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec

from shared.sandbox.files import (
    LIST_EXAMINED,
    LIST_SECONDS,
    EditReply,
    FileRefused,
    FileServiceBroken,
    ListReply,
    ReadReply,
    WriteReply,
)
from shared.sandbox.handle import SandboxRefused
from worker.tools.base import ToolContext, ToolOutcome, make_tool, truncation_marker

# The largest file read_file and edit_file take whole (the reply is still capped).
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_LISTED = 1000

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


async def _read(ctx: ToolContext, args: ReadFileInput) -> ToolOutcome:
    reply = await ctx.sandbox.files.request(
        ReadReply,
        "read_text",
        path=args.path,
        start_line=args.start_line,
        end_line=args.end_line,
        max_bytes=ctx.output_cap,
        max_file_bytes=MAX_FILE_BYTES,
    )
    marker = truncation_marker(reply.omitted) if reply.omitted else ""
    return ToolOutcome(reply.text + marker, False)


async def _write(ctx: ToolContext, args: WriteFileInput) -> ToolOutcome:
    reply = await ctx.sandbox.files.request(
        WriteReply, "write_text", path=args.path, content=args.content
    )
    return ToolOutcome(f"wrote {reply.size} bytes to {reply.path}", False)


async def _edit(ctx: ToolContext, args: EditFileInput) -> ToolOutcome:
    reply = await ctx.sandbox.files.request(
        EditReply,
        "edit",
        path=args.path,
        old=args.old,
        new=args.new,
        max_file_bytes=MAX_FILE_BYTES,
    )
    return ToolOutcome(f"edited {reply.path}", False)


async def _list(ctx: ToolContext, args: ListFilesInput) -> ToolOutcome:
    reply = await ctx.sandbox.files.request(
        ListReply,
        "list",
        path=args.path,
        glob=args.glob,
        max_entries=MAX_LISTED,
        max_examined=LIST_EXAMINED,
        max_seconds=LIST_SECONDS,
    )
    text = "\n".join(reply.entries) or "(empty)"
    if reply.more:
        text += f"\n[listing stopped at {MAX_LISTED} entries]"
    if reply.stopped:
        text += f"\n[listing stopped early: it {reply.stopped}]"
    return ToolOutcome(text, False)


def _guarded(
    func: Callable[[ToolContext, Any], Awaitable[ToolOutcome]],
) -> Callable[[ToolContext, Any], Awaitable[ToolOutcome]]:
    """Refusals and failures of the file service as error outcomes."""

    async def run(ctx: ToolContext, args: Any) -> ToolOutcome:
        if ctx.sandbox.confinement.kind == "refused":
            return ToolOutcome(ctx.sandbox.confinement.refusal(), True)
        try:
            return await func(ctx, args)
        except (FileRefused, FileServiceBroken, SandboxRefused) as exc:
            return ToolOutcome(str(exc), True)

    return run


READ_FILE = make_tool(
    "read_file",
    "Read a text file in the workspace, optionally only lines start_line..end_line.",
    ReadFileInput,
    _guarded(_read),
)
WRITE_FILE = make_tool(
    "write_file",
    "Create or overwrite a file in the workspace with the given content.",
    WriteFileInput,
    _guarded(_write),
)
EDIT_FILE = make_tool(
    "edit_file",
    "Replace the one exact occurrence of `old` with `new` in a file of the workspace.",
    EditFileInput,
    _guarded(_edit),
)
LIST_FILES = make_tool(
    "list_files",
    "List a directory of the workspace, or the files matching a glob under it.",
    ListFilesInput,
    _guarded(_list),
)
