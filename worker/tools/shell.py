"""The `bash` tool: a shell command in the sandbox workspace."""

from __future__ import annotations

from typing import Annotated

import msgspec

from worker.isolation import describe
from worker.sandbox import run_command
from worker.tools.base import ToolContext, ToolOutcome, make_tool, truncation_marker


class BashInput(msgspec.Struct, forbid_unknown_fields=True):
    command: Annotated[str, msgspec.Meta(min_length=1, description="the command line")]
    timeout: (
        Annotated[float, msgspec.Meta(gt=0, description="seconds before it is killed")] | None
    ) = None


async def run_bash(ctx: ToolContext, args: BashInput) -> ToolOutcome:
    timeout = min(args.timeout or ctx.timeout, ctx.timeout)
    if ctx.isolation.kind == "refused":
        return ToolOutcome(describe(ctx.isolation), True)
    result = await run_command(
        args.command,
        ctx.workspace,
        timeout=timeout,
        output_cap=ctx.output_cap,
        isolation=ctx.isolation,
        sandbox_id=ctx.sandbox_id,
        network=ctx.network,
    )
    text = result.output
    if result.omitted_bytes:
        text += truncation_marker(result.omitted_bytes)
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
