"""The agent's tools: what the model may call, and how each call runs in the sandbox.

A failing call never fails the turn: it becomes a `tool_result` with
`is_error: true` and a message the model can act on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from worker.tools.base import Tool, ToolContext, ToolOutcome, ToolSpec
from worker.tools.files import EDIT_FILE, LIST_FILES, READ_FILE, WRITE_FILE
from worker.tools.shell import BASH

TOOLS: dict[str, Tool] = {
    tool.spec.name: tool for tool in (BASH, READ_FILE, WRITE_FILE, EDIT_FILE, LIST_FILES)
}


def tool_specs(allowed: list[str]) -> list[ToolSpec]:
    return [TOOLS[name].spec for name in allowed if name in TOOLS]


async def execute_tool(
    ctx: ToolContext, name: str, raw_input: dict[str, Any], allowed: list[str]
) -> ToolOutcome:
    tool = TOOLS.get(name) if name in allowed else None
    if tool is None:
        return ToolOutcome(f"unknown tool {name!r}; available: {', '.join(allowed)}", True)
    try:
        args = msgspec.convert(raw_input, tool.input_type)
    except msgspec.ValidationError as exc:
        return ToolOutcome(f"invalid input for {name}: {exc}", True)
    return await tool.run(ctx, args)


__all__ = ["TOOLS", "ToolContext", "ToolOutcome", "ToolSpec", "execute_tool", "tool_specs"]
