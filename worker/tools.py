"""The agent's tools: what the model may call, and how each call runs in the sandbox.

A failing call never fails the turn: it becomes a `tool_result` with
`is_error: true` and a message the model can act on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec

from worker.sandbox import run_command


class ToolOutcome(msgspec.Struct, frozen=True):
    content: str
    is_error: bool


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a model is told about a tool."""

    name: str
    description: str
    input_schema: dict[str, Any]


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    workspace: Path
    timeout: float
    output_cap: int


def truncation_marker(omitted: int) -> str:
    return f"\n[output truncated: {omitted} more bytes not shown]"


class BashInput(msgspec.Struct, forbid_unknown_fields=True):
    command: Annotated[str, msgspec.Meta(min_length=1)]
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None


async def run_bash(ctx: ToolContext, args: BashInput) -> ToolOutcome:
    timeout = min(args.timeout or ctx.timeout, ctx.timeout)
    result = await run_command(
        args.command, ctx.workspace, timeout=timeout, output_cap=ctx.output_cap
    )
    text = result.output
    if result.omitted_bytes:
        text += truncation_marker(result.omitted_bytes)
    if result.timed_out:
        return ToolOutcome(f"{text}\n[command timed out after {timeout:g} s and was killed]", True)
    if result.exit_code != 0:
        return ToolOutcome(f"{text}\n[exit code {result.exit_code}]", True)
    return ToolOutcome(text, False)


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    spec: ToolSpec
    input_type: type[msgspec.Struct]
    run: Callable[[ToolContext, Any], Awaitable[ToolOutcome]]


def _schema(input_type: type[msgspec.Struct]) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(input_type)
    # msgspec puts the object under $defs; models want the object itself.
    ref = schema.get("$ref", "").rsplit("/", 1)[-1]
    body: dict[str, Any] = schema.get("$defs", {}).get(ref, schema)
    body.pop("title", None)
    body["additionalProperties"] = False
    return body


BASH = Tool(
    spec=ToolSpec(
        name="bash",
        description=(
            "Run a shell command with bash in the sandbox workspace (the working "
            "directory). Returns combined stdout and stderr. Optional `timeout` in seconds."
        ),
        input_schema=_schema(BashInput),
    ),
    input_type=BashInput,
    run=run_bash,
)

TOOLS: dict[str, Tool] = {tool.spec.name: tool for tool in (BASH,)}


async def execute_tool(ctx: ToolContext, name: str, raw_input: dict[str, Any]) -> ToolOutcome:
    tool = TOOLS.get(name)
    if tool is None:
        return ToolOutcome(f"unknown tool {name!r}; available: {', '.join(TOOLS)}", True)
    try:
        args = msgspec.convert(raw_input, tool.input_type)
    except msgspec.ValidationError as exc:
        return ToolOutcome(f"invalid input for {name}: {exc}", True)
    return await tool.run(ctx, args)
