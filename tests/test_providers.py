"""Real providers end to end: API and worker processes, the official SDKs, a local model API.

Every case runs for both wire formats. Assertions look at what the client sees
(events, the returned message, the history) and at what the model API received.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import ANTHROPIC_TEST_KEY, OPENAI_TEST_KEY
from fake_llm import FakeLLM, Received, Reply, anthropic_stream, openai_stream
from helpers import StreamReader, text_message

TOOL_NAMES = {"bash", "read_file", "write_file", "edit_file", "list_files"}


@dataclass
class Wire:
    name: str

    def reply(self, *blocks: tuple[Any, ...], tools: bool = False) -> Reply:
        if self.name == "anthropic":
            return Reply(chunks=anthropic_stream(*blocks, stop="tool_use" if tools else "end_turn"))
        return Reply(chunks=openai_stream(*blocks, stop="tool_calls" if tools else "stop"))

    def messages(self, received: Received) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = received.body["messages"]
        return messages

    def tool_names(self, received: Received) -> set[str]:
        tools = received.body["tools"]
        if self.name == "anthropic":
            return {t["name"] for t in tools}
        return {t["function"]["name"] for t in tools}


@pytest.fixture(params=["anthropic", "openai"])
def wire(request: pytest.FixtureRequest) -> Wire:
    return Wire(request.param)


@dataclass
class Agent:
    client: httpx.Client
    sid: str
    model: str


def _agent(client: httpx.Client, sandbox_id: str, wire: Wire, **extra: Any) -> Agent:
    model = f"model-{uuid.uuid4().hex[:12]}"
    body = {"metadata": {}, "agent": {"provider": wire.name, "model": model, **extra}}
    response = client.post(f"/sandboxes/{sandbox_id}/sessions", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["agent"]["provider"] == wire.name
    return Agent(client, response.json()["id"], model)


def _send(agent: Agent, text: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    reader = StreamReader(agent.client, agent.sid)
    response = agent.client.post(f"/sessions/{agent.sid}/messages", json=text_message(text))
    return response, reader.join()


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    """The event types, with a run of text deltas as one: deltas that arrive while
    the worker is writing are joined (their text and order are what count)."""
    kinds: list[str] = []
    for event in events:
        if not (event["_event"] == "text_delta" and kinds and kinds[-1] == "text_delta"):
            kinds.append(event["_event"])
    return kinds


def _texts(events: list[dict[str, Any]]) -> list[str]:
    """The text of each run of text deltas, joined."""
    texts: list[str] = []
    previous = ""
    for event in events:
        if event["_event"] == "text_delta":
            if previous == "text_delta":
                texts[-1] += event["text"]
            else:
                texts.append(event["text"])
        previous = event["_event"]
    return texts


def test_text_only_reply_streams_as_it_arrives(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire, system_prompt="Be brief.")
    reply = wire.reply(("text", ["Hel", "lo ", "there"]))
    # Tokens that arrive together may go out joined; these arrive apart.
    reply.delay = 0.05
    fake_llm.script(agent.model, reply)
    response, events = _send(agent, "hi")

    assert response.status_code == 200
    assert response.json()["content"] == [{"type": "text", "text": "Hello there"}]
    assert _kinds(events) == ["text_delta", "text_complete", "session_completed"]
    assert _texts(events) == ["Hello there"]
    assert events[0]["text"] == "Hel"  # the first token goes out as it arrives
    assert events[-1]["usage"] == {"input_tokens": 11, "output_tokens": 7}

    (received,) = fake_llm.requests[agent.model]
    assert received.body["stream"] is True
    assert wire.tool_names(received) == TOOL_NAMES
    if wire.name == "anthropic":
        assert received.path == "/v1/messages"
        sent_key = received.headers.get("x-api-key") or received.headers["authorization"]
        assert sent_key.removeprefix("Bearer ") == ANTHROPIC_TEST_KEY
        assert received.body["system"] == "Be brief."
        assert wire.messages(received) == [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]
        assert received.body["tools"][0]["input_schema"]["required"] == ["command"]
    else:
        assert received.path == "/v1/chat/completions"
        assert received.headers["authorization"] == f"Bearer {OPENAI_TEST_KEY}"
        assert wire.messages(received) == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]
        assert received.body["tools"][0]["function"]["parameters"]["required"] == ["command"]


def test_text_then_bash_then_final_text(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(
        agent.model,
        wire.reply(
            ("text", ["Let me ", "look."]),
            ("tool", "call_1", "bash", {"command": "echo from-the-sandbox"}),
            tools=True,
        ),
        wire.reply(("text", ["It printed ", "from-the-sandbox."])),
    )
    response, events = _send(agent, "what does echo say?")

    assert response.status_code == 200
    content = response.json()["content"]
    assert [b["type"] for b in content] == ["text", "tool_use", "tool_result", "text"]
    assert content[1] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "bash",
        "input": {"command": "echo from-the-sandbox"},
    }
    assert content[2] == {
        "type": "tool_result",
        "tool_use_id": "call_1",
        "content": "from-the-sandbox\n",
        "is_error": False,
    }
    assert _kinds(events) == [
        "text_delta",
        "text_complete",
        "tool_use_start",
        "tool_use_complete",
        "tool_result",
        "text_delta",
        "text_complete",
        "session_completed",
    ]
    deltas = [e for e in events if e["_event"] == "text_delta"]
    assert all(e["index"] in (0, 3) for e in deltas)
    others = [e.get("index") for e in events[:-1] if e["_event"] != "text_delta"]
    assert others == [0, 1, 1, 2, 3]
    assert _texts(events) == ["Let me look.", "It printed from-the-sandbox."]
    assert events[-1]["usage"] == {"input_tokens": 22, "output_tokens": 14}

    _first, second = fake_llm.requests[agent.model]
    if wire.name == "anthropic":
        assert wire.messages(second) == [
            {"role": "user", "content": [{"type": "text", "text": "what does echo say?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "bash",
                        "input": {"command": "echo from-the-sandbox"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_1",
                        "content": "from-the-sandbox\n",
                    }
                ],
            },
        ]
    else:
        assert wire.messages(second)[1:] == [
            {"role": "user", "content": "what does echo say?"},
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "bash",
                            "arguments": '{"command":"echo from-the-sandbox"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "from-the-sandbox\n"},
        ]


def test_two_tool_calls_in_one_response_both_run(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(
        agent.model,
        wire.reply(
            ("tool", "call_a", "write_file", {"path": "a.txt", "content": "alpha"}),
            ("tool", "call_b", "bash", {"command": "echo beta"}),
            tools=True,
        ),
        wire.reply(("text", ["both done"])),
    )
    response, events = _send(agent, "do two things")

    content = response.json()["content"]
    assert [b["type"] for b in content] == [
        "tool_use",
        "tool_use",
        "tool_result",
        "tool_result",
        "text",
    ]
    assert [b["tool_use_id"] for b in content[2:4]] == ["call_a", "call_b"]
    assert content[2]["content"] == "wrote 5 bytes to a.txt" and content[3]["content"] == "beta\n"
    assert _kinds(events).count("tool_result") == 2
    assert _kinds(events).count("tool_use_complete") == 2
    second = fake_llm.requests[agent.model][1]
    if wire.name == "anthropic":
        results = wire.messages(second)[-1]["content"]
        assert [r["tool_use_id"] for r in results] == ["call_a", "call_b"]
    else:
        tail = wire.messages(second)[-3:]
        assert [m["role"] for m in tail] == ["assistant", "tool", "tool"]
        assert len(tail[0]["tool_calls"]) == 2


def test_tool_error_is_reported_and_the_model_recovers(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(
        agent.model,
        wire.reply(("tool", "call_1", "read_file", {"path": "missing.txt"}), tools=True),
        wire.reply(
            ("tool", "call_2", "write_file", {"path": "missing.txt", "content": "x"}), tools=True
        ),
        wire.reply(("text", ["Created it."])),
    )
    response, events = _send(agent, "read missing.txt")

    content = response.json()["content"]
    assert content[1]["is_error"] is True and "no file" in content[1]["content"]
    assert content[3]["is_error"] is False
    assert content[-1] == {"type": "text", "text": "Created it."}
    assert events[-1]["stop_reason"] == "end_turn"
    second = fake_llm.requests[agent.model][1]
    if wire.name == "anthropic":
        assert wire.messages(second)[-1]["content"][0]["is_error"] is True
    else:
        assert "no file" in wire.messages(second)[-1]["content"]


def test_rate_limit_is_retried_then_succeeds(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(agent.model, Reply(status=429), wire.reply(("text", ["after a wait"])))
    response, _events = _send(agent, "hello")
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == "after a wait"
    assert len(fake_llm.requests[agent.model]) == 2


def test_server_errors_end_in_session_failed_without_secrets(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    leak = {"message": f"upstream exploded near {ANTHROPIC_TEST_KEY} {OPENAI_TEST_KEY}"}
    fake_llm.script(agent.model, *[Reply(status=500, error=leak)] * 3)
    response, events = _send(agent, "hello")

    assert response.status_code == 502
    problem = response.json()
    assert problem["code"] == "turn_failed" and problem["error"]["code"] == "provider_error"
    assert events[-1]["_event"] == "session_failed"
    assert events[-1]["stop_reason"] == "error"
    assert events[-1]["error"]["code"] == "provider_error"
    assert len(fake_llm.requests[agent.model]) == 3  # the first try and two retries
    everything = response.text + str(events) + client.get(f"/sessions/{agent.sid}").text
    assert "SECRET" not in everything
    after = client.get(f"/sessions/{agent.sid}").json()
    assert after["state"] == "active" and len(after["messages"]) == 1


def test_refused_key_fails_at_once_with_provider_auth(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(agent.model, Reply(status=401, error={"message": "invalid x-api-key"}))
    response, _events = _send(agent, "hello")
    assert response.json()["error"]["code"] == "provider_auth"
    assert len(fake_llm.requests[agent.model]) == 1


def test_stream_cut_midway_fails_the_turn_and_keeps_partial_text(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    full = wire.reply(("text", ["partial ", "answer ", "never ", "finished"]))
    fake_llm.script(agent.model, Reply(chunks=full.chunks[:4], cut=True))
    response, events = _send(agent, "hello")

    assert response.status_code == 502
    failed = events[-1]
    assert failed["_event"] == "session_failed" and failed["stop_reason"] == "error"
    assert failed["error"]["code"] in {"provider_stream_cut", "provider_unavailable"}
    assert "text_delta" in _kinds(events)
    history = client.get(f"/sessions/{agent.sid}").json()
    assert history["state"] == "active"
    assert history["messages"][1]["content"][0]["text"].startswith("partial")


def test_max_iterations_bounds_the_turn(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire, max_iterations=2)
    looping = [
        wire.reply(("tool", f"call_{i}", "bash", {"command": f"echo {i}"}), tools=True)
        for i in range(3)
    ]
    fake_llm.script(agent.model, *looping)
    response, events = _send(agent, "loop forever")

    assert response.status_code == 200
    assert response.json()["stop_reason"] == "max_iterations"
    assert events[-1]["stop_reason"] == "max_iterations"
    assert len(fake_llm.requests[agent.model]) == 2
    assert _kinds(events).count("tool_result") == 2


def test_interrupt_mid_stream_closes_the_model_stream(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    slow = wire.reply(("text", [f"word{i} " for i in range(40)]))
    slow.delay = 0.25
    fake_llm.script(agent.model, slow)
    reader = StreamReader(client, agent.sid)
    outcome: dict[str, httpx.Response] = {}
    sender = threading.Thread(
        target=lambda: outcome.update(
            send=client.post(f"/sessions/{agent.sid}/messages", json=text_message("talk"))
        )
    )
    sender.start()
    deadline = time.monotonic() + 10
    while not any(e["_event"] == "text_delta" for e in reader.events):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    interrupted_at = time.monotonic()
    assert client.post(f"/sessions/{agent.sid}/interrupt").json()["interrupted"] is True
    sender.join(10)
    events = reader.join()

    reply = outcome["send"].json()
    assert reply["stop_reason"] == "interrupted"
    assert reply["content"][0]["text"].startswith("word0")
    assert events[-1]["stop_reason"] == "interrupted"
    # The model's server hears the close on its own thread, a moment after the
    # worker closed the connection and ended the turn: wait for it, bounded.
    deadline = time.monotonic() + 5
    while not fake_llm.disconnects[agent.model] and time.monotonic() < deadline:
        time.sleep(0.01)
    (closed_at,) = fake_llm.disconnects[agent.model]
    assert closed_at - interrupted_at < 1.0


def test_images_reach_the_model_in_its_format(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(agent.model, wire.reply(("text", ["a red square"])))
    png = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image", "media_type": "image/png", "data": png},
        ],
    }
    assert client.post(f"/sessions/{agent.sid}/messages", json=message).status_code == 200
    (received,) = fake_llm.requests[agent.model]
    user = wire.messages(received)[-1]
    if wire.name == "anthropic":
        assert user["content"][1] == {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": png},
        }
    else:
        assert user["content"][1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{png}"},
        }


def test_history_is_mapped_across_turns(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    fake_llm.script(
        agent.model,
        wire.reply(("tool", "c1", "bash", {"command": "echo 1"}), tools=True),
        wire.reply(("text", ["one"])),
        wire.reply(("text", ["two"])),
        wire.reply(("text", ["three"])),
    )
    for text in ("first", "second", "third"):
        assert client.post(f"/sessions/{agent.sid}/messages", json=text_message(text)).is_success
    last = [m for m in wire.messages(fake_llm.requests[agent.model][-1]) if m["role"] != "system"]
    if wire.name == "anthropic":
        assert [m["role"] for m in last] == [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
        assert last[2]["content"][0]["type"] == "tool_result"
        assert last[3]["content"] == [{"type": "text", "text": "one"}]
        assert last[4]["content"] == [{"type": "text", "text": "second"}]
    else:
        assert [m["role"] for m in last] == [
            "user",
            "assistant",
            "tool",
            "assistant",
            "user",
            "assistant",
            "user",
        ]
        assert last[3] == {"role": "assistant", "content": "one"}
        assert last[-1] == {"role": "user", "content": "third"}


def test_bad_agent_config_is_rejected(client: httpx.Client, sandbox_id: str) -> None:
    for agent in (
        {"provider": "gemini", "model": "x"},
        {"provider": "openai"},  # a real provider needs a model
        {"allowed_tools": ["rm_rf"]},
        {"max_iterations": 0},
        {"temperature": 2},
    ):
        response = client.post(
            f"/sandboxes/{sandbox_id}/sessions", json={"metadata": {}, "agent": agent}
        )
        assert response.status_code == 422, agent
        assert response.json()["code"] == "invalid_body"


def test_allowed_tools_limit_what_the_model_sees_and_may_run(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire, allowed_tools=["read_file"])
    fake_llm.script(
        agent.model,
        wire.reply(("tool", "c1", "bash", {"command": "touch pwned"}), tools=True),
        wire.reply(("text", ["ok"])),
    )
    response, _ = _send(agent, "try bash")
    assert wire.tool_names(fake_llm.requests[agent.model][0]) == {"read_file"}
    assert response.json()["content"][1]["is_error"] is True
    session = client.get(f"/sessions/{agent.sid}").json()
    assert session["agent"]["allowed_tools"] == ["read_file"]


def test_error_sent_mid_stream_fails_the_turn(
    client: httpx.Client, sandbox_id: str, wire: Wire, fake_llm: FakeLLM
) -> None:
    agent = _agent(client, sandbox_id, wire)
    started = wire.reply(("text", ["half ", "an answer"])).chunks[:4]
    if wire.name == "anthropic":
        error = (
            b'event: error\ndata: {"type": "error", '
            b'"error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
        )
    else:
        error = b'data: {"error": {"message": "Overloaded", "type": "server_error"}}\n\n'
    fake_llm.script(agent.model, Reply(chunks=[*started, error]))
    response, events = _send(agent, "hello")

    assert response.status_code == 502
    assert events[-1]["_event"] == "session_failed"
    assert events[-1]["error"]["code"].startswith("provider_")
    assert "Overloaded" in events[-1]["error"]["message"]
