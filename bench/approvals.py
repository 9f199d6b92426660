"""Approvals: what a waiting turn keeps in Redis, and how soon a decision starts its tool.

The tool is `date +%s.%N` in the sandbox, so its own output says when it
started; the figure is that minus when the decision was sent (same host, same
clock). For comparison, the same for a plain send whose tool needs no approval.

    .venv/bin/python -m bench.approvals [--decisions 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import httpx
import redis

from bench.harness import AUTH, new_session, private_redis, service
from shared import keys

ASK = {"agent": {"permissions": {"bash": "ask"}}}
CLOCK = "run: date +%s.%N"


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _tool_output(client: httpx.Client, sid: str) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        session = client.get(f"/sessions/{sid}").json()
        if session["state"] == "active":
            return float(session["messages"][-1]["content"][1]["content"])
        time.sleep(0.01)
    raise RuntimeError("the turn did not end")


def measure(base: str, redis_url: str, decisions: int) -> dict[str, float]:
    store = redis.Redis.from_url(redis_url)
    to_tool: list[float] = []
    plain: list[float] = []
    memory = 0
    with httpx.Client(base_url=base + "/api/v1", headers=AUTH, timeout=30) as client:
        for i in range(decisions):
            sid = new_session(client, ASK)
            waiting = client.post(f"/sessions/{sid}/messages", json=_message(CLOCK))
            assert waiting.status_code == 202, waiting.text
            call = waiting.json()["pending_approvals"][0]["tool_use_id"]
            if i == 0:
                memory = sum(
                    int(store.memory_usage(key) or 0)
                    for key in (keys.suspended(sid), keys.approvals(sid))
                )
            sent = time.time()
            client.post(f"/sessions/{sid}/approvals/{call}", json={"decision": "allow"})
            to_tool.append(_tool_output(client, sid) - sent)

            sid = new_session(client)
            sent = time.time()
            reply = client.post(f"/sessions/{sid}/messages", json=_message(CLOCK))
            plain.append(float(reply.json()["content"][1]["content"]) - sent)
    store.close()
    return {
        "memory_bytes": memory,
        "decision_to_tool_p50_ms": statistics.median(to_tool) * 1000,
        "decision_to_tool_max_ms": max(to_tool) * 1000,
        "send_to_tool_p50_ms": statistics.median(plain) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=20)
    args = parser.parse_args()
    with private_redis() as url, service(url) as running:
        figures = measure(running.base, url, args.decisions)
    print("9. approvals: a turn awaiting approval of one bash call, and its decision")
    print(f"a waiting turn keeps {figures['memory_bytes']:.0f} B in Redis (its two keys)")
    print(
        f"decision to tool start: p50 {figures['decision_to_tool_p50_ms']:.1f} ms, "
        f"max {figures['decision_to_tool_max_ms']:.1f} ms over {args.decisions} decisions"
    )
    print(f"for comparison, send to tool start: p50 {figures['send_to_tool_p50_ms']:.1f} ms")


if __name__ == "__main__":
    main()
