"""What every tool is made of: its spec for the model, its input type, its runner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from shared.sandbox.handle import OpenSandbox


class ToolOutcome(msgspec.Struct, frozen=True):
    content: str
    is_error: bool


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a model is told about a tool."""

    name: str
    description: str
    input_schema: dict[str, Any]


class ToolContext(msgspec.Struct, frozen=True, kw_only=True):
    sandbox: OpenSandbox
    timeout: float
    output_cap: int


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    spec: ToolSpec
    input_type: type[msgspec.Struct]
    run: Callable[[ToolContext, Any], Awaitable[ToolOutcome]]


def make_tool(
    name: str,
    description: str,
    input_type: type[msgspec.Struct],
    run: Callable[[ToolContext, Any], Awaitable[ToolOutcome]],
) -> Tool:
    schema: dict[str, Any] = msgspec.json.schema(input_type)
    # msgspec puts the object under $defs; models want the object itself.
    ref = schema.get("$ref", "").rsplit("/", 1)[-1]
    body: dict[str, Any] = schema.get("$defs", {}).get(ref, schema)
    body.pop("title", None)
    body["additionalProperties"] = False
    spec = ToolSpec(name=name, description=description, input_schema=body)
    return Tool(spec=spec, input_type=input_type, run=run)


def truncation_marker(omitted: int) -> str:
    return f"\n[output truncated: {omitted} more bytes not shown]"
