"""The Sessions API end to end: real API and worker processes over a real Redis."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid

import httpx
from helpers import StreamReader, text_message, wait_state, wait_until

RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and str(uuid.UUID(value)) == value


def test_create_session_matches_seed_shape(client: httpx.Client, sandbox_id: str) -> None:
    response = client.post(
        f"/sandboxes/{sandbox_id}/sessions", json={"metadata": {"purpose": "code-review"}}
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {
        "id",
        "sandbox_id",
        "state",
        "metadata",
        "created_at",
        "updated_at",
        "agent",
    }
    assert is_uuid(body["id"])
    assert body["sandbox_id"] == sandbox_id
    assert body["state"] == "active"
    assert body["metadata"] == {"purpose": "code-review"}
    assert RFC3339_Z.match(body["created_at"]) and RFC3339_Z.match(body["updated_at"])
    assert body["agent"]["provider"] == "demo"  # the effective agent, beside the seed's fields


def test_list_sessions_is_an_array_with_cursor_paging(
    client: httpx.Client, sandbox_id: str
) -> None:
    created = [
        client.post(f"/sandboxes/{sandbox_id}/sessions", json={"metadata": {"n": i}}).json()["id"]
        for i in range(5)
    ]
    everything = client.get(f"/sandboxes/{sandbox_id}/sessions")
    assert everything.status_code == 200
    assert [s["id"] for s in everything.json()] == created

    seen: list[str] = []
    params: dict[str, str] = {"limit": "2"}
    while True:
        page = client.get(f"/sandboxes/{sandbox_id}/sessions", params=params)
        assert page.status_code == 200 and isinstance(page.json(), list)
        seen += [s["id"] for s in page.json()]
        cursor = page.headers.get("x-next-cursor")
        if cursor is None:
            break
        assert 'rel="next"' in page.headers["link"]
        params = {"limit": "2", "cursor": cursor}
    assert seen == created


def test_send_returns_the_assistant_message_and_history_holds_both(
    client: httpx.Client, session_id: str
) -> None:
    response = client.post(f"/sessions/{session_id}/messages", json=text_message("Hello agent"))
    assert response.status_code == 200
    reply = response.json()
    assert reply["role"] == "assistant"
    assert reply["session_id"] == session_id
    assert is_uuid(reply["id"]) and RFC3339_Z.match(reply["timestamp"])
    assert reply["content"][0]["type"] == "text" and "demo agent" in reply["content"][0]["text"]

    session = client.get(f"/sessions/{session_id}").json()
    assert session["state"] == "active"
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"]
    user = session["messages"][0]
    assert user["content"] == [{"type": "text", "text": "Hello agent"}]
    assert {"id", "session_id", "role", "content", "timestamp"} <= set(user)
    assert session["messages"][1] == reply
    assert session["updated_at"] >= session["created_at"]


def test_tool_turn_streams_events_in_order_with_consecutive_seq(
    client: httpx.Client, session_id: str
) -> None:
    reader = StreamReader(client, session_id)
    response = client.post(
        f"/sessions/{session_id}/messages", json=text_message("run: echo hello-from-sandbox")
    )
    assert response.status_code == 200
    events = reader.join()

    kinds = [e["_event"] for e in events]
    assert kinds[:3] == ["tool_use_start", "tool_use_complete", "tool_result"]
    assert "text_delta" in kinds and kinds[-2:] == ["text_complete", "session_completed"]
    assert kinds.count("text_delta") >= 2
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert reader.ids == [str(s) for s in seqs]
    assert all(e["type"] == e["_event"] for e in events)

    start, complete, result = events[:3]
    assert start["name"] == "bash" and start["index"] == 0
    assert complete["input"] == {"command": "echo hello-from-sandbox"}
    assert result["content"] == "hello-from-sandbox\n" and result["is_error"] is False
    assert result["tool_use_id"] == start["id"] and result["index"] == 1

    deltas = "".join(e["text"] for e in events if e["_event"] == "text_delta")
    final = events[-1]
    assert final["stop_reason"] == "end_turn"
    assert final["message"] == response.json()
    assert final["message"]["content"][2]["text"] == deltas
    assert {e["turn_id"] for e in events} == {final["message"]["turn_id"]}


def test_bash_runs_in_the_sandbox_workspace(client: httpx.Client, sandbox_id: str) -> None:
    first = client.post(f"/sandboxes/{sandbox_id}/sessions", json={}).json()["id"]
    second = client.post(f"/sandboxes/{sandbox_id}/sessions", json={}).json()["id"]
    client.post(f"/sessions/{first}/messages", json=text_message("run: echo shared > note.txt"))
    reply = client.post(f"/sessions/{second}/messages", json=text_message("run: cat note.txt"))
    assert reply.json()["content"][1]["content"] == "shared\n"
    elsewhere = client.post("/sandboxes", json={}).json()["id"]
    third = client.post(f"/sandboxes/{elsewhere}/sessions", json={}).json()["id"]
    reply = client.post(f"/sessions/{third}/messages", json=text_message("run: cat note.txt"))
    assert reply.json()["content"][1]["is_error"] is True


def test_send_while_running_returns_409_naming_the_turn(
    client: httpx.Client, session_id: str
) -> None:
    accepted = client.post(
        f"/sessions/{session_id}/messages",
        params={"wait": "0"},
        json=text_message("run: sleep 5"),
    )
    assert accepted.status_code == 202
    turn_id = accepted.json()["turn_id"]

    conflict = client.post(f"/sessions/{session_id}/messages", json=text_message("again"))
    assert conflict.status_code == 409
    assert conflict.headers["content-type"].startswith("application/problem+json")
    problem = conflict.json()
    assert problem["code"] == "turn_in_progress" and problem["turn_id"] == turn_id
    assert turn_id in problem["detail"]
    client.post(f"/sessions/{session_id}/interrupt")
    # The interrupt answers `running` when the turn takes longer than its wait to stop.
    history = wait_state(client, session_id, "active")["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_interrupt_stops_a_running_command_fast_and_session_takes_next_message(
    client: httpx.Client, session_id: str, sandbox_id: str
) -> None:
    marker = f"sleep-{uuid.uuid4().hex[:8]}"
    outcome: dict[str, httpx.Response] = {}

    def send() -> None:
        outcome["send"] = client.post(
            f"/sessions/{session_id}/messages",
            json=text_message(f"run: bash -c 'exec -a {marker} sleep 60'"),
        )

    sender = threading.Thread(target=send)
    sender.start()
    _wait_running(client, session_id)
    wait_until(lambda: _processes_named(f"^{marker}"), 10, "the command to start")
    started = time.monotonic()
    interrupted = client.post(f"/sessions/{session_id}/interrupt")
    sender.join(10)
    elapsed = time.monotonic() - started

    assert interrupted.status_code == 200
    assert interrupted.json()["interrupted"] is True
    assert elapsed < 2.0
    reply = outcome["send"].json()
    assert reply["stop_reason"] == "interrupted"
    assert reply["content"][0]["type"] == "tool_use"
    assert reply["content"][1]["is_error"] is True
    # The command is dead by the reply; the sandbox's launcher (an inner bwrap in
    # a session of its own, killed as its parent dies: PR_SET_PDEATHSIG) may
    # take a moment more to exit on a loaded machine, as it once did in a run
    # of the suite beside two CPU hogs.
    assert _processes_named(f"^{marker}") == []
    wait_until(lambda: _processes_named(marker) == [], 2, "the sandbox's launcher to exit")

    after = client.post(f"/sessions/{session_id}/messages", json=text_message("still there?"))
    assert after.status_code == 200


def test_interrupt_with_nothing_running_is_a_harmless_200(
    client: httpx.Client, session_id: str
) -> None:
    response = client.post(f"/sessions/{session_id}/interrupt")
    assert response.status_code == 200
    assert response.json()["interrupted"] is False
    assert client.get(f"/sessions/{session_id}").json()["messages"] == []


def test_wait_limit_answers_202_and_the_turn_still_completes(
    client: httpx.Client, session_id: str
) -> None:
    response = client.post(
        f"/sessions/{session_id}/messages",
        params={"wait": "0.2"},
        json=text_message("run: sleep 1; echo done"),
    )
    assert response.status_code == 202
    body = response.json()
    assert body["state"] == "running" and is_uuid(body["turn_id"])
    assert response.headers["location"] == f"/api/v1/sessions/{session_id}"
    # Absolute, so a page on another origin can follow it as it is.
    api = str(client.base_url).rstrip("/")
    assert body["stream_url"].startswith(f"{api}/sessions/{session_id}/stream")

    deadline = time.monotonic() + 10
    while client.get(f"/sessions/{session_id}").json()["state"] != "active":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    messages = client.get(f"/sessions/{session_id}").json()["messages"]
    assert messages[-1]["turn_id"] == body["turn_id"]
    assert messages[-1]["content"][1]["content"] == "done\n"


def test_client_that_disconnects_mid_send_still_gets_its_turn_stored(
    stack: object, client: httpx.Client, session_id: str
) -> None:
    with contextlib.suppress(httpx.ReadTimeout):
        client.post(
            f"/sessions/{session_id}/messages",
            json=text_message("run: sleep 1; echo survived"),
            timeout=0.3,
        )
    deadline = time.monotonic() + 10
    while True:
        messages = client.get(f"/sessions/{session_id}").json()["messages"]
        if len(messages) == 2:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert messages[1]["content"][1]["content"] == "survived\n"


def test_delete_session_then_404(client: httpx.Client, sandbox_id: str, session_id: str) -> None:
    assert client.delete(f"/sessions/{session_id}").status_code == 204
    gone = client.get(f"/sessions/{session_id}")
    assert gone.status_code == 404 and gone.json()["code"] == "session_not_found"
    assert client.get(f"/sandboxes/{sandbox_id}/sessions").json() == []


def test_delete_sandbox_removes_sessions_and_workspace(stack: object, client: httpx.Client) -> None:
    sandbox = client.post("/sandboxes", json={"metadata": {"team": "a"}}).json()
    assert sandbox["metadata"] == {"team": "a"}
    assert client.get(f"/sandboxes/{sandbox['id']}").json() == sandbox
    sid = client.post(f"/sandboxes/{sandbox['id']}/sessions", json={}).json()["id"]
    client.post(f"/sessions/{sid}/messages", json=text_message("run: touch file"))
    workspace = stack.workdir / "sandboxes" / sandbox["id"]  # type: ignore[attr-defined]
    assert (workspace / "file").exists()

    assert client.delete(f"/sandboxes/{sandbox['id']}").status_code == 204
    assert client.get(f"/sandboxes/{sandbox['id']}").status_code == 404
    assert client.get(f"/sessions/{sid}").status_code == 404
    assert not workspace.exists()
    assert sandbox["id"] not in [s["id"] for s in client.get("/sandboxes").json()]


def _wait_running(client: httpx.Client, sid: str) -> None:
    deadline = time.monotonic() + 10
    while client.get(f"/sessions/{sid}").json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _processes_named(marker: str) -> list[str]:
    import subprocess

    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]
