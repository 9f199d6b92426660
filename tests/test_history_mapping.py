"""Our one-message-per-turn history, mapped to each provider's format."""

from __future__ import annotations

from shared.models import ImageBlock, Message, TextBlock, ToolResultBlock, ToolUseBlock
from worker.providers.anthropic import to_anthropic_messages
from worker.providers.openai import to_openai_messages


def _msg(role: str, *blocks: object) -> Message:
    return Message(
        id="m",
        session_id="s",
        role=role,
        content=list(blocks),
        timestamp="t",  # type: ignore[arg-type]
    )


TURN = _msg(
    "assistant",
    TextBlock(text="Two checks."),
    ToolUseBlock(id="a", name="bash", input={"command": "ls"}),
    ToolUseBlock(id="b", name="read_file", input={"path": "x"}),
    ToolResultBlock(tool_use_id="a", content="x\n"),
    ToolResultBlock(tool_use_id="b", content="no file", is_error=True),
    TextBlock(text="Now writing."),
    ToolUseBlock(id="c", name="write_file", input={"path": "x", "content": "1"}),
    ToolResultBlock(tool_use_id="c", content="wrote 1 bytes to x"),
    TextBlock(text="Done."),
)
IMAGE = ImageBlock(media_type="image/png", data="iVBORw0KGgo=")


def test_anthropic_splits_a_turn_into_calls_and_results() -> None:
    history = [
        _msg("user", TextBlock(text="go"), IMAGE),
        TURN,
        _msg("user", TextBlock(text="next")),
    ]
    assert to_anthropic_messages(history) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "go"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Two checks."},
                {"type": "tool_use", "id": "a", "name": "bash", "input": {"command": "ls"}},
                {"type": "tool_use", "id": "b", "name": "read_file", "input": {"path": "x"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "a", "content": "x\n"},
                {"type": "tool_result", "tool_use_id": "b", "content": "no file", "is_error": True},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Now writing."},
                {
                    "type": "tool_use",
                    "id": "c",
                    "name": "write_file",
                    "input": {"path": "x", "content": "1"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "c", "content": "wrote 1 bytes to x"}
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
        {"role": "user", "content": [{"type": "text", "text": "next"}]},
    ]


def test_anthropic_merges_a_turn_ending_in_results_with_the_next_user_message() -> None:
    interrupted = _msg(
        "assistant",
        ToolUseBlock(id="a", name="bash", input={"command": "sleep 9"}),
        ToolResultBlock(tool_use_id="a", content="[interrupted]", is_error=True),
    )
    empty = _msg("assistant")
    history = [_msg("user", TextBlock(text="1")), interrupted, _msg("user", TextBlock(text="2"))]
    history += [empty, _msg("user", TextBlock(text="3"))]
    mapped = to_anthropic_messages(history)
    assert [m["role"] for m in mapped] == ["user", "assistant", "user"]
    assert [p.get("text", p["type"]) for p in mapped[2]["content"]] == ["tool_result", "2", "3"]


def test_openai_gives_each_response_its_message_and_each_result_a_tool_message() -> None:
    history = [_msg("user", TextBlock(text="go"), IMAGE), TURN]
    mapped = to_openai_messages("sys", history)
    assert [m["role"] for m in mapped] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert mapped[1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert mapped[2]["content"] == "Two checks."
    assert [c["id"] for c in mapped[2]["tool_calls"]] == ["a", "b"]
    assert mapped[2]["tool_calls"][0]["function"] == {
        "name": "bash",
        "arguments": '{"command":"ls"}',
    }
    assert mapped[4] == {"role": "tool", "tool_call_id": "b", "content": "[tool error] no file"}
    assert mapped[5]["content"] == "Now writing." and mapped[5]["tool_calls"][0]["id"] == "c"
    assert mapped[7] == {"role": "assistant", "content": "Done."}
