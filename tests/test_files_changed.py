"""`files_changed`: what a turn created, modified and deleted in its workspace, on
`session_completed` and on the stored assistant message (real API and worker)."""

from __future__ import annotations

from typing import Any

import httpx
from helpers import StreamReader, text_message


def _turn(client: httpx.Client, sid: str, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The assistant message the send returns, and the turn's session_completed event."""
    reader = StreamReader(client, sid, params={"after": "0"}, until=_turns(client, sid) + 1)
    reply = client.post(f"/sessions/{sid}/messages", json=text_message(text))
    assert reply.status_code == 200, reply.text
    completed = [e for e in reader.join() if e["_event"] == "session_completed"][-1]
    return reply.json(), completed


def _turns(client: httpx.Client, sid: str) -> int:
    messages = client.get(f"/sessions/{sid}").json()["messages"]
    return sum(1 for m in messages if m["role"] == "assistant")


def test_a_turn_lists_exactly_what_it_created_modified_and_deleted(
    client: httpx.Client, sandbox_id: str, session_id: str
) -> None:
    files = f"/sandboxes/{sandbox_id}/files"
    for name in ("same.txt", "edit.txt", "old/gone.txt"):
        assert client.put(f"{files}/{name}", content=b"before\n").status_code == 201
    message, completed = _turn(
        client,
        session_id,
        "run: echo new > made.txt && echo more >> edit.txt && rm old/gone.txt && mkdir -p new/dir",
    )
    expected = [
        {"path": "edit.txt", "change": "modified", "type": "file", "size": 12},
        {"path": "made.txt", "change": "created", "type": "file", "size": 4},
        {"path": "new", "change": "created", "type": "dir", "size": 0},
        {"path": "new/dir", "change": "created", "type": "dir", "size": 0},
        {"path": "old/gone.txt", "change": "deleted", "type": "file", "size": None},
    ]
    assert completed["files_changed"] == expected
    assert completed["files_changed_truncated"] is False
    assert completed["message"]["files_changed"] == expected
    assert message["files_changed"] == expected
    stored = client.get(f"/sessions/{session_id}").json()["messages"][-1]
    assert stored["files_changed"] == expected


def test_a_turn_without_tools_changed_nothing(client: httpx.Client, session_id: str) -> None:
    message, completed = _turn(client, session_id, "hello there")
    assert completed["files_changed"] == [] and completed["files_changed_truncated"] is False
    assert message["files_changed"] == []


def test_a_huge_change_is_capped_and_marked_truncated(
    client: httpx.Client, session_id: str
) -> None:
    message, completed = _turn(
        client, session_id, "run: mkdir many && cd many && for i in $(seq 1 1100); do : > f$i; done"
    )
    assert len(completed["files_changed"]) == 1000
    assert completed["files_changed_truncated"] is True
    assert completed["files_changed"][0] == {
        "path": "many",
        "change": "created",
        "type": "dir",
        "size": 0,
    }
    assert message["files_changed_truncated"] is True
