"""JSON logs: one object a line, with the request's and the turn's context, no secrets."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from conftest import ADMIN_KEY, ALPHA_KEY, Stack
from helpers import new_session, text_message


def _lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for proc in stack.procs:
        for line in proc.log.read_text().splitlines():
            if line.strip():
                lines.append(json.loads(line))  # every line is one JSON object
    return lines


def test_json_logs_carry_request_and_turn_context(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(log_format="json", log_level="INFO")
    with stack.client() as client:
        sid = new_session(client)
        reply = client.post(
            f"/sessions/{sid}/messages",
            json=text_message("run: echo hi"),
            headers={"X-Request-ID": "req-123"},
        )
        assert reply.status_code == 200
        turn_id = reply.json()["turn_id"]
    # The reply is out once the terminal event is; the worker logs right after.
    deadline = time.monotonic() + 10
    while not any(line["msg"] == "turn done" for line in _lines(stack)):
        assert time.monotonic() < deadline, "the worker never logged the turn's end"
        time.sleep(0.05)
    lines = _lines(stack)
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    queued = [line for line in lines if line["msg"] == "turn queued"]
    assert queued and queued[0]["request_id"] == "req-123"
    assert queued[0]["tenant"] == "alpha" and queued[0]["session_id"] == sid
    assert queued[0]["turn_id"] == turn_id
    done = [line for line in lines if line["msg"] == "turn done"]
    assert done and done[0]["turn_id"] == turn_id and done[0]["job_id"] == turn_id
    assert done[0]["session_id"] == sid
    text = json.dumps(lines)
    assert ALPHA_KEY not in text and ADMIN_KEY not in text


def test_the_api_and_the_worker_keep_their_start_up_heap_out_of_full_collections(
    make_stack: Callable[..., Stack],
) -> None:
    """Each process freezes what it made at start-up (`shared.heap`): a worker
    that has imported the model SDKs holds some 220,000 objects, and a full
    collection over them held its event loop for about 125 ms; the first one
    came during a fresh worker's first turns, each streaming turn losing as
    much (bench 6e: p99 97 ms added at 20 Anthropic turns, 3 ms with the heap
    frozen)."""
    stack = make_stack(log_format="json", log_level="INFO")
    frozen = {
        proc.log.name: int(line["msg"].split(": ", 1)[1].split()[0])
        for proc in stack.procs
        for line in map(json.loads, filter(str.strip, proc.log.read_text().splitlines()))
        if line["msg"].startswith("start-up heap frozen: ")
    }
    assert sorted(frozen) == ["api-0.log", "worker-1.log"], frozen
    assert all(count > 10_000 for count in frozen.values()), frozen
