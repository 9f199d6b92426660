"""A stalled model ends the turn with `provider_timeout` within a known bound.

The model API is the local fake, made to stall: after one chunk, or before its
response head. The stack runs with an idle timeout of 1 s and one retry, so the
bounds (README: Reliability) are seconds: a stall mid-stream ends the turn one
idle timeout after the last byte; a model that never answers, after
(retries + 1) idle timeouts and the SDK's backoff between them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Stack, model_env, stack_of_its_own
from fake_llm import FakeLLM, Reply, anthropic_stream, openai_stream
from helpers import StreamReader, text_message

IDLE = 1.0
RETRIES = 1
# Backoff between attempts: both SDKs wait at most 0.5 s before the first retry.
FIRST_BYTE_BOUND = (RETRIES + 1) * IDLE + 0.5 + 1.5  # + slack for a loaded machine
MID_STREAM_BOUND = IDLE + 1.5


@pytest.fixture(scope="module")
def stalled_stack(redis_url: str, fake_llm: FakeLLM) -> Iterator[Stack]:
    env = {
        "SANDSTREAM_PROVIDER_IDLE_TIMEOUT_SECONDS": str(IDLE),
        "SANDSTREAM_PROVIDER_MAX_RETRIES": str(RETRIES),
        **model_env(fake_llm),
    }
    with stack_of_its_own(redis_url, 14, env) as running:
        yield running


def _session(client: httpx.Client, wire: str) -> tuple[str, str]:
    model = f"stall-{uuid.uuid4().hex[:12]}"
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    body = {"agent": {"provider": wire, "model": model}}
    response = client.post(f"/sandboxes/{sandbox}/sessions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"]), model


def _first_chunk(wire: str) -> list[bytes]:
    """The stream's start and one text piece, then nothing."""
    if wire == "anthropic":
        return anthropic_stream(("text", ["Hel", "lo"]))[:3]  # message, block, delta
    return openai_stream(("text", ["Hel", "lo"]))[:2]  # role, delta


def _failed_within(
    stack: Stack, fake_llm: FakeLLM, sid: str, model: str, bound: float
) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """Send, and check the turn failed with provider_timeout within `bound`
    seconds of the model's first request (the SDK's import on a worker's first
    call to it is not the model's stall)."""
    with stack.client() as client:
        reader = StreamReader(client, sid)
        reply = client.post(
            f"/sessions/{sid}/messages", params={"wait": "20"}, json=text_message("hi")
        )
        answered_at = time.monotonic()
        events = reader.join()
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["code"] == "provider_timeout"
    terminal = events[-1]
    assert terminal["_event"] == "session_failed", terminal
    assert terminal["error"]["code"] == "provider_timeout"
    took = answered_at - fake_llm.requests[model][0].at
    assert took < bound, f"the stalled turn took {took:.2f} s (bound {bound:.2f} s)"
    return took, terminal, events


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_a_model_that_stalls_mid_stream_ends_with_provider_timeout(
    stalled_stack: Stack, fake_llm: FakeLLM, wire: str
) -> None:
    with stalled_stack.client() as client:
        sid, model = _session(client, wire)
    fake_llm.script(model, Reply(chunks=_first_chunk(wire), body_stall=30))
    took, terminal, events = _failed_within(stalled_stack, fake_llm, sid, model, MID_STREAM_BOUND)
    print(f"{wire}: one chunk then a stall -> provider_timeout {took:.2f} s after the request")
    # What arrived before the stall is kept.
    assert [e["text"] for e in events if e["_event"] == "text_delta"] == ["Hel"]
    assert terminal["stop_reason"] == "error"
    assert len(fake_llm.requests[model]) == 1  # a stream is not asked for again


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_a_model_that_sends_no_response_head_ends_with_provider_timeout(
    stalled_stack: Stack, fake_llm: FakeLLM, wire: str
) -> None:
    with stalled_stack.client() as client:
        sid, model = _session(client, wire)
    fake_llm.script(model, *[Reply(head_stall=30) for _ in range(RETRIES + 1)])
    took, _, _ = _failed_within(stalled_stack, fake_llm, sid, model, FIRST_BYTE_BOUND)
    print(f"{wire}: no response head -> provider_timeout {took:.2f} s after the request")
    assert len(fake_llm.requests[model]) == RETRIES + 1
