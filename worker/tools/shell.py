"""The `bash` tool: a shell command in the sandbox workspace."""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.sandbox.handle import SandboxRefused
from worker.tools.base import ToolContext, ToolOutcome, make_tool, truncation_marker


class BashInput(msgspec.Struct, forbid_unknown_fields=True):
    command: Annotated[str, msgspec.Meta(min_length=1, description="the command line")]
    timeout: (
        Annotated[float, msgspec.Meta(gt=0, description="seconds before it is killed")] | None
    ) = None


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


async def run_bash(ctx: ToolContext, args: BashInput) -> ToolOutcome:
    timeout = min(args.timeout or ctx.timeout, ctx.timeout)
    confinement = ctx.sandbox.confinement
    if confinement.kind == "refused":
        return ToolOutcome(confinement.refusal(), True)
    try:
        result = await ctx.sandbox.run(args.command, timeout=timeout, output_cap=ctx.output_cap)
    except SandboxRefused as exc:
        return ToolOutcome(str(exc), True)
    text = result.output
    if result.omitted_bytes:
        text += truncation_marker(result.omitted_bytes)
    for wall in result.walls:
        if wall == "memory":
            limit = _gib(confinement.memory_bytes)
            text += f"\n[the sandbox's memory limit ({limit}) was reached: a process was killed]"
        elif wall == "processes":
            text += f"\n[the sandbox's process limit ({confinement.max_processes}) was reached]"
        elif wall == "disk" and confinement.quota is not None:
            text += f"\n[the sandbox's disk quota ({_gib(confinement.quota.limits.bytes)}) is full]"
    if result.timed_out:
        return ToolOutcome(f"{text}\n[command timed out after {timeout:g} s and was killed]", True)
    if result.exit_code != 0:
        return ToolOutcome(f"{text}\n[exit code {result.exit_code}]", True)
    return ToolOutcome(text, False)


BASH = make_tool(
    "bash",
    "Run a shell command with bash in the sandbox workspace (the working directory). "
    "Returns combined stdout and stderr; a non-zero exit is reported as an error.",
    BashInput,
    run_bash,
)
