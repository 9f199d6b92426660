"""The model request a provider makes is the one the SDK's own streaming `create`
makes: same method, URL, headers and JSON body (the OpenAI provider hands the
SDK its body encoded, past the SDK's walk of its parameters)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest

from shared.models import Message, TextBlock, ToolUseBlock, new_id, now_rfc3339
from shared.settings import Settings
from worker.providers.base import ProviderRequest
from worker.providers.openai import OpenAIProvider
from worker.tools import tool_specs

_SSE = (
    b'data: {"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


class _Capture(httpx2.AsyncBaseTransport):
    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        self.requests.append(request)
        headers = [(b"content-type", b"text/event-stream")]
        return httpx2.Response(200, headers=headers, content=_SSE)


def _seen(request: httpx2.Request) -> tuple[str, str, list[tuple[str, str]], Any]:
    headers = sorted((k.lower(), v) for k, v in request.headers.items())
    return request.method, str(request.url), headers, json.loads(request.content)


@pytest.mark.parametrize("with_tools", [False, True])
def test_openai_request_is_the_sdks(monkeypatch: pytest.MonkeyPatch, with_tools: bool) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://model.test/v1")
    provider = OpenAIProvider("some-model", Settings(max_output_tokens=321))
    capture = _Capture()
    provider.client._client._transport = capture  # type: ignore[attr-defined]
    sid = new_id()
    history = [
        Message(
            id=new_id(),
            session_id=sid,
            role="user",
            content=[TextBlock(text="list the files")],
            timestamp=now_rfc3339(),
        ),
        Message(
            id=new_id(),
            session_id=sid,
            role="assistant",
            content=[TextBlock(text="sure"), ToolUseBlock(id="c1", name="bash", input={"a": 1})],
            timestamp=now_rfc3339(),
        ),
    ]
    tools = tool_specs(["bash", "read_file"]) if with_tools else []
    request = ProviderRequest(system="be brief", messages=history, tools=tools)

    async def both() -> None:
        items = [item async for item in provider.stream(request)]
        assert len(items) == 2  # the text, the end
        # What the provider sends, as the SDK's public streaming call.
        body = json.loads(capture.requests[0].content)
        extra = {k: v for k, v in body.items() if k not in ("model", "stream")}
        create = provider.client.chat.completions.with_streaming_response.create
        async with create(model="some-model", messages=[], stream=True, extra_body=extra) as r:
            await r.read()

    asyncio.run(both())
    ours, sdks = capture.requests
    assert _seen(ours) == _seen(sdks)
    assert _seen(ours)[3]["max_tokens"] == 321
    assert ("tools" in _seen(ours)[3]) is with_tools
