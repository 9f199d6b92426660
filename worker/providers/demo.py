"""The built-in `demo` provider: deterministic, offline, no key.

`run: <command>` makes it call `bash` with the command, then describe the result;
each further line that starts with `run: ` is one more call in the same response.
Any other message gets a short reply streamed in several chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from shared.events import Usage
from shared.models import Message, ToolResultBlock, text_of
from worker.providers.base import (
    MessageEnd,
    ProviderRequest,
    StreamItem,
    TextChunk,
    ToolCallReady,
    ToolCallStart,
)

RUN_PREFIX = "run: "
_CHUNK_WORDS = 3


def _last_user(messages: list[Message]) -> Message | None:
    return next((m for m in reversed(messages) if m.role == "user"), None)


def _reply_for(text: str) -> str:
    words = len(text.split())
    return (
        f"This is the sandstream demo agent. You said {words} word{'s' * (words != 1)}. "
        f"Start a message with `{RUN_PREFIX}` and a shell command, and I will run it "
        "in this sandbox's workspace."
    )


def _describe(result: ToolResultBlock) -> str:
    output = result.content.strip() or "(no output)"
    verdict = "failed" if result.is_error else "succeeded"
    return f"The command {verdict}. Its output:\n{output}"


class DemoProvider:
    name = "demo"

    async def stream(self, request: ProviderRequest) -> AsyncIterator[StreamItem]:
        user = _last_user(request.messages)
        user_text = text_of(user.content) if user else ""
        current = request.messages[-1] if request.messages[-1].role == "assistant" else None
        done = current.content if current else []
        results = [b for b in done if isinstance(b, ToolResultBlock)]
        if user_text.startswith(RUN_PREFIX) and not results:
            commands = [
                line[len(RUN_PREFIX) :]
                for line in user_text.split("\n")
                if line.startswith(RUN_PREFIX)
            ]
            for position, command in enumerate(commands):
                digest = hashlib.sha256(f"{position}:{command}".encode()).hexdigest()[:20]
                call_id = "toolu_" + digest
                yield ToolCallStart(call_id, "bash")
                yield ToolCallReady(call_id, "bash", {"command": command})
            yield MessageEnd("tool_use", Usage(input_tokens=len(user_text), output_tokens=1))
            return
        reply = "\n".join(_describe(r) for r in results) if results else _reply_for(user_text)
        words = reply.split(" ")
        for i in range(0, len(words), _CHUNK_WORDS):
            piece = " ".join(words[i : i + _CHUNK_WORDS])
            yield TextChunk(piece if i == 0 else " " + piece)
        yield MessageEnd("end_turn", Usage(input_tokens=len(user_text), output_tokens=len(words)))
