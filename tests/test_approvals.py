"""Approval of tool calls: turns that wait for a person, in Redis, holding no worker.

One stack (an API and a worker with a single job slot) serves most tests; the
tests that kill processes start their own.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from conftest import ADMIN_KEY, BETA_KEY, Stack, one_slot_fixtures
from fake_llm import FakeLLM, Reply, anthropic_stream, openai_stream
from helpers import (
    ASK_BASH,
    StreamReader,
    decide,
    send_until_waiting,
    session_with,
    text_message,
    wait_state,
    wait_until,
)

from shared import keys
from shared.models import CommandRules
from shared.permissions import command_ruling, rule_for
from shared.settings import Settings

one_slot, api = one_slot_fixtures(db=9, tool_timeout_seconds=5)


# ---- the policy, without the service ----------------------------------------------


def test_bash_rules_match_by_pattern() -> None:
    rules = CommandRules(deny=["rm -rf /*"], ask=["rm *", "git push*"], allow=["*"])
    assert command_ruling(rules, "ls -la").verdict == "allow"
    assert command_ruling(rules, "rm notes.txt").verdict == "ask"
    assert command_ruling(rules, "git push origin main").verdict == "ask"
    assert command_ruling(rules, "git pushy").verdict == "ask"  # a prefix, as written
    assert command_ruling(rules, "rm -rf /etc").verdict == "deny"
    # A chained command is asked about when any piece of it is.
    assert command_ruling(rules, "ls; rm x").verdict == "ask"
    assert command_ruling(rules, "echo $(rm x)").verdict == "ask"
    assert command_ruling(rules, "true && rm -rf /home").verdict == "deny"
    # `?` is one character; everything else is literal (no character classes).
    assert command_ruling(CommandRules(allow=["ls ?"]), "ls a").verdict == "allow"
    assert command_ruling(CommandRules(allow=["ls [ab]"]), "ls a").verdict == "ask"
    assert command_ruling(CommandRules(allow=["ls [ab]"]), "ls [ab]").verdict == "allow"
    # Allow patterns match the whole line: a chain is not let through by its start.
    assert command_ruling(CommandRules(allow=["git status*"]), "git status").verdict == "allow"
    # No rule matched: asked.
    assert command_ruling(CommandRules(allow=["ls*"]), "make").verdict == "ask"


@pytest.mark.parametrize(
    "command",
    [
        "\\rm x",  # a backslash before the name
        "/bin/rm x",  # a path to the command
        "rm\tx",  # a tab between words
        "'rm' x",
        '"rm" x',
        "r''m x",  # quotes inside the name
        "r\\\nm x",  # a line continuation inside the name
        "if true; then rm x; fi",
        "while true; do rm x; done",
        "! rm x",
        "FOO=1 rm x",
        "env rm x",
        "env -i FOO=1 rm x",
        "command rm x",
        "exec rm x",
        "nohup rm x",
        "time rm x",
        "nice -n 5 rm x",
        "timeout 5 rm x",
        "eval rm x",
        "eval 'rm x'",
        ">/dev/null rm x",
        "2>&1 rm x",
        "bash -c 'rm x'",
        'sh -ec "rm x"',
        "  rm x",
        "echo ok && (rm x)",
        "time -p rm x",
        "coproc rm x",
        "busybox rm x",
        "xargs -n1 rm x",
        'echo "$(ls; rm x)"',  # a command inside double quotes still runs
        "/usr/bin/r[m] x",  # a name the shell finds by globbing
        "$RM x",  # a name the matcher cannot read
    ],
)
def test_an_ask_rule_is_not_sneaked_past_by_shell_syntax(command: str) -> None:
    rules = CommandRules(deny=["rm -rf /*"], ask=["rm *"], allow=["*"])
    assert command_ruling(rules, command).verdict == "ask", command
    if (worse := command.replace("rm x", "rm -rf /")) != command:
        assert command_ruling(rules, worse).verdict == "deny", worse


def test_an_allow_rule_lets_through_only_a_chain_of_allowed_commands() -> None:
    rules = CommandRules(ask=["rm *"], allow=["ls *", "git status*", "echo *", "[ *"])
    for allowed in (
        "ls -la",
        "ls -la 2>&1",
        "echo approved-$((6*7))",
        "git status; ls -l",
        "[ -f x ] && echo $HOME",
    ):
        assert command_ruling(rules, allowed).verdict == "allow", allowed
    for asked in ("ls x; rm x", "ls x && curl evil", "echo $(rm x)", "ls `rm x`", "ls x | sh"):
        assert command_ruling(rules, asked).verdict == "ask", asked
    # Operators inside quotes are text, except in a command substitution.
    assert command_ruling(rules, "echo 'a;b' | grep -r 'x(' .").verdict == "ask"  # grep
    assert command_ruling(rules, "echo 'a;b' \"c|d\"; ls -l").verdict == "allow"
    assert command_ruling(rules, 'echo "`ls; rm x`"').verdict == "ask"


def test_ruling_on_a_hostile_command_line_takes_milliseconds() -> None:
    # Stars and a long line: a backtracking regex took minutes for 100 characters.
    rules = CommandRules(ask=["*a*a*a*a*a*a*b"] * 100, deny=["*q*"] * 100, allow=["echo *"] * 100)
    for command in ("a" * 60_000, "echo x;" * 9000, 'echo "a" ' * 7000, "a" * 1_000_000):
        began = time.perf_counter()
        ruling = command_ruling(rules, command)
        took = time.perf_counter() - began
        assert took < 1.0, (len(command), took)
        assert ruling.verdict in ("ask", "allow"), ruling
    assert command_ruling(rules, "a" * 1_000_000).rule == "bash: a command line too long to rule on"
    chained = command_ruling(rules, "echo x;" * 9000)
    assert chained.rule == "bash: a command line of too many commands to rule on"


def test_permissions_pick_the_tool_entry_then_the_wildcard() -> None:
    permissions: Any = {"*": "deny", "read_file": "allow", "bash": CommandRules(allow=["ls"])}
    assert rule_for(permissions, "read_file", {"path": "x"}).verdict == "allow"
    assert rule_for(permissions, "write_file", {"path": "x"}).verdict == "deny"
    assert rule_for(permissions, "bash", {"command": "ls"}).verdict == "allow"
    assert rule_for(permissions, "bash", {"command": "ls x"}).verdict == "ask"
    assert rule_for(permissions, "bash", {"no": "command"}).verdict == "ask"
    assert rule_for({}, "bash", {"command": "ls"}).verdict == "allow"


def test_the_service_default_permissions_come_from_settings() -> None:
    rules = '{"*": "allow", "bash": {"ask": ["rm *"], "allow": ["*"]}}'
    settings = Settings.from_env({"SANDSTREAM_TOOL_PERMISSIONS": rules})
    assert settings.default_agent().permissions["bash"] == CommandRules(ask=["rm *"], allow=["*"])
    for bad in ('{"bash": "maybe"}', '{"read_file": {"ask": ["x"]}}', "not json"):
        with pytest.raises(SystemExit, match="tool_permissions"):
            Settings.from_env({"SANDSTREAM_TOOL_PERMISSIONS": bad})
    with pytest.raises(SystemExit, match="approval_timeout_seconds"):
        Settings.from_env({"SANDSTREAM_APPROVAL_TIMEOUT_SECONDS": "0"})


# ---- the flow ---------------------------------------------------------------------


def test_ask_waits_without_a_worker_slot_then_allow_runs_the_tool(
    one_slot: Stack, api: httpx.Client
) -> None:
    sid = session_with(api, ASK_BASH)
    reader = StreamReader(api, sid)
    waiting = send_until_waiting(api, sid, "run: echo approved-$((6*7))")
    [pending] = waiting["pending_approvals"]
    assert pending["name"] == "bash"
    assert pending["input"] == {"command": "echo approved-$((6*7))"}
    assert pending["expires_at"].endswith("Z")

    session = api.get(f"/sessions/{sid}").json()
    assert session["state"] == "awaiting_approval"
    assert session["pending_approvals"] == [pending]
    # Out of the running index, which the reaper scans for turns whose worker died.
    store = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    assert not store.sismember(keys.RUNNING, sid)
    assert store.hmget(keys.session(sid), ["started", "lease_epoch"]) == [None, None]  # no lease
    store.close()
    assert session["agent"]["permissions"] == {"bash": "ask"}

    # The one job slot is free: another session's turn runs meanwhile.
    other = session_with(api, {})
    done = api.post(f"/sessions/{other}/messages", json=text_message("run: echo meanwhile"))
    assert done.status_code == 200, done.text
    assert done.json()["content"][1]["content"] == "meanwhile\n"

    allowed = decide(api, sid, pending["tool_use_id"], "allow")
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["decision"] == "allow"
    assert allowed.json()["state"] == "running"
    events = reader.join(15)
    kinds = [e["_event"] for e in events]
    assert kinds.index("tool_use_complete") < kinds.index("tool_approval_requested")
    assert kinds.index("tool_approval_requested") < kinds.index("tool_approval_resolved")
    assert kinds.index("tool_approval_resolved") < kinds.index("tool_result")
    resolved = next(e for e in events if e["_event"] == "tool_approval_resolved")
    assert resolved["decided_by"] and resolved["decided_by"] not in api.headers["authorization"]
    assert events[-1]["_event"] == "session_completed"
    content = events[-1]["message"]["content"]
    assert content[1] == {
        "type": "tool_result",
        "tool_use_id": pending["tool_use_id"],
        "content": "approved-42\n",
        "is_error": False,
    }
    assert "approved-42" in content[-1]["text"]
    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[-1]["seq"] + 1))
    assert wait_state(api, sid, "active")["messages"][-1]["content"] == content

    # The continuation's job was forgotten by the turn's end like a first job
    # (only the two jobs' results are left), and the session names it no more:
    # the next turn's job is its own, which the reaper looks for.
    store = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    turn_id = events[-1]["turn_id"]
    results = lambda: sorted(k.decode() for k in store.keys(f"arq:*{turn_id}*"))  # noqa: E731
    wait_until(lambda: len(results()) == 2, 10, "the continuation's result")
    assert all(key.startswith("arq:result:") for key in results()), results()
    assert store.hget(keys.session(sid), "job_id") is None
    store.close()


def test_deny_gives_the_model_an_error_result_with_the_reason(
    one_slot: Stack, api: httpx.Client
) -> None:
    sid = session_with(api, ASK_BASH)
    before = StreamReader(api, sid)
    [pending] = send_until_waiting(api, sid, "run: touch denied.txt")["pending_approvals"]
    # A client that connects after the request learns of it from the replay.
    after = StreamReader(api, sid, params={"after": "0"})
    with one_slot.client(BETA_KEY) as stranger:  # another tenant cannot see or decide it
        assert stranger.get(f"/sessions/{sid}").status_code == 404
    denied = decide(api, sid, pending["tool_use_id"], "deny", "not in this workspace")
    assert denied.status_code == 200, denied.text
    seen = [before.join(15), after.join(15)]
    for events in seen:
        kinds = [e["_event"] for e in events]
        assert "tool_approval_requested" in kinds and "tool_approval_resolved" in kinds
    assert seen[0] == seen[1]  # the decision shows on every stream, alike
    final = seen[1][-1]
    assert final["_event"] == "session_completed" and final["stop_reason"] == "end_turn"
    result = final["message"]["content"][1]
    assert result["is_error"] is True
    assert "not in this workspace" in result["content"]
    assert "failed" in final["message"]["content"][-1]["text"]  # the model saw the error
    listing = api.get(f"/sandboxes/{api.get(f'/sessions/{sid}').json()['sandbox_id']}/files")
    assert "denied.txt" not in listing.text


def test_deny_policy_never_runs_and_says_so(api: httpx.Client) -> None:
    sid = session_with(api, {"permissions": {"bash": {"deny": ["rm *"], "allow": ["*"]}}})
    reply = api.post(f"/sessions/{sid}/messages", json=text_message("run: rm -f x"))
    assert reply.status_code == 200, reply.text
    result = reply.json()["content"][1]
    assert result["is_error"] is True and "bash deny 'rm *'" in result["content"]


def test_bash_rules_ask_for_one_call_and_the_response_waits_whole(api: httpx.Client) -> None:
    rules = {"bash": {"ask": ["rm *"], "allow": ["*"]}, "*": "ask"}
    sid = session_with(api, {"permissions": rules, "allowed_tools": ["bash"]})
    waiting = send_until_waiting(api, sid, "run: echo kept\nrun: rm -f nothing")
    [pending] = waiting["pending_approvals"]
    assert pending["input"] == {"command": "rm -f nothing"} and pending["index"] == 1
    assert decide(api, sid, pending["tool_use_id"], "deny").json()["state"] == "running"
    content = wait_state(api, sid, "active")["messages"][-1]["content"]
    assert [b["type"] for b in content[:4]] == [
        "tool_use",
        "tool_use",
        "tool_result",
        "tool_result",
    ]
    assert content[2]["content"] == "kept\n" and content[2]["is_error"] is False
    assert content[3]["is_error"] is True and "denied by the user" in content[3]["content"]


def test_send_while_waiting_is_409_naming_the_turn(one_slot: Stack, api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    waiting = send_until_waiting(api, sid, "run: echo later")
    again = api.post(f"/sessions/{sid}/messages", json=text_message("hello?"))
    assert again.status_code == 409
    problem = again.json()
    assert problem["code"] == "turn_in_progress"
    assert problem["turn_id"] == waiting["turn_id"]
    assert problem["state"] == "awaiting_approval"
    assert "awaiting approval" in problem["detail"]
    with one_slot.client(ADMIN_KEY) as ops:
        assert ops.get("/ops/queues").json()[0]["awaiting_approval"] >= 1
        metrics = httpx.get(one_slot.base_url + "/metrics", headers=ops.headers).text
        assert "\nsandstream_turns_awaiting_approval " in metrics


def test_a_retried_send_while_waiting_answers_again_that_it_waits(api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    message, key = text_message("run: echo once"), {"Idempotency-Key": f"retry-{sid}"}
    first = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert first.status_code == 202, first.text
    retry = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert retry.status_code == 202, retry.text
    assert retry.json()["turn_id"] == first.json()["turn_id"]
    assert retry.json()["pending_approvals"] == first.json()["pending_approvals"]
    listed = api.get(f"/sandboxes/{api.get(f'/sessions/{sid}').json()['sandbox_id']}/sessions")
    assert [s["state"] for s in listed.json()] == ["awaiting_approval"]
    assert api.delete(f"/sessions/{sid}").status_code == 204


def test_a_retried_send_after_the_decision_waits_for_the_turn_to_end(api: httpx.Client) -> None:
    """The send is retried (same Idempotency-Key) after its turn waited and was
    approved, while the resumed turn runs: the retry blocks until the turn's end
    and answers its message (before: the approval request in the log made it
    answer 202 "still running" at once, with nothing pending)."""
    sid = session_with(api, ASK_BASH)
    message, key = text_message("run: sleep 1; echo resumed"), {"Idempotency-Key": f"r-{sid}"}
    first = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert first.status_code == 202, first.text
    [pending] = first.json()["pending_approvals"]
    assert decide(api, sid, pending["tool_use_id"], "allow").status_code == 200
    retry = api.post(f"/sessions/{sid}/messages", json=message, headers=key)
    assert retry.status_code == 200, retry.text
    assert retry.json()["turn_id"] == first.json()["turn_id"]
    assert retry.json()["content"][1]["content"] == "resumed\n"


def test_decisions_are_checked_and_tenant_scoped(one_slot: Stack, api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    [pending] = send_until_waiting(api, sid, "run: echo a\nrun: echo b")["pending_approvals"][:1]
    call = pending["tool_use_id"]
    with one_slot.client(BETA_KEY) as beta:
        stranger = decide(beta, sid, call, "allow")
        assert stranger.status_code == 404 and stranger.json()["code"] == "session_not_found"
    unknown = decide(api, sid, "toolu_nope", "allow")
    assert unknown.status_code == 404 and unknown.json()["code"] == "approval_not_found"
    long_id = decide(api, sid, "x" * 5000, "allow")
    assert long_id.status_code == 404 and len(long_id.json()["tool_use_id"]) < 300
    not_a_session = decide(api, "not-a-uuid", call, "allow")
    assert not_a_session.status_code == 404
    assert not_a_session.json()["code"] == "session_not_found"
    bad = api.post(f"/sessions/{sid}/approvals/{call}", json={"decision": "maybe"})
    assert bad.status_code == 422 and bad.json()["field"] == "$.decision"
    extra = api.post(f"/sessions/{sid}/approvals/{call}", json={"decision": "allow", "x": 1})
    assert extra.status_code == 422 and extra.json()["code"] == "invalid_body"
    empty = api.post(f"/sessions/{sid}/approvals/{call}", content=b"")
    assert empty.status_code == 400 and empty.json()["code"] == "empty_body"
    not_json = api.post(f"/sessions/{sid}/approvals/{call}", content=b"{")
    assert not_json.status_code == 400 and not_json.json()["code"] == "malformed_json"

    first = decide(api, sid, call, "deny", "no")
    assert first.status_code == 200 and first.json()["state"] == "awaiting_approval"
    retry = decide(api, sid, call, "deny", "other words")
    assert retry.status_code == 200 and retry.json() == first.json()
    changed = decide(api, sid, call, "allow")
    assert changed.status_code == 409 and changed.json()["code"] == "approval_conflict"
    # One call decided, one pending: the session shows only the pending one.
    session = api.get(f"/sessions/{sid}").json()
    assert [p["tool_use_id"] for p in session["pending_approvals"]] != [call]
    assert len(session["pending_approvals"]) == 1
    api.post(f"/sessions/{sid}/interrupt")


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        ({"permissions": {"bash": "maybe"}}, "$.agent.permissions[...]"),
        ({"permissions": {"rm": "ask"}}, "$.agent.permissions"),
        ({"permissions": {"read_file": {"ask": ["x"]}}}, "$.agent"),
        ({"permissions": {"bash": {"ask": [""]}}}, "$.agent.permissions[...].ask[0]"),
        ({"permissions": {"bash": {"sometimes": ["x"]}}}, "$.agent.permissions[...]"),
        ({"permissions": ["bash"]}, "$.agent.permissions"),
        ({"approval_timeout_seconds": 0}, "$.agent.approval_timeout_seconds"),
    ],
)
def test_bad_permissions_are_422_naming_the_field(
    api: httpx.Client, agent: dict[str, Any], field: str
) -> None:
    sandbox = api.post("/sandboxes", json={}).json()["id"]
    created = api.post(f"/sandboxes/{sandbox}/sessions", json={"agent": agent})
    assert created.status_code == 422, created.text
    assert created.json()["code"] == "invalid_body"
    assert created.json()["field"].startswith(field.split("[")[0])


def test_undecided_calls_are_denied_when_they_time_out(api: httpx.Client) -> None:
    sid = session_with(api, {**ASK_BASH, "approval_timeout_seconds": 0.5})
    send_until_waiting(api, sid, "run: echo too-late")
    session = wait_state(api, sid, "active", timeout=10)
    result = session["messages"][-1]["content"][1]
    assert result["is_error"] is True and "timed out" in result["content"]
    resolved = [e for e in _log(api, sid) if e["_event"] == "tool_approval_resolved"]
    assert resolved[-1]["decided_by"] == "timeout" and resolved[-1]["reason"] == "timed out"


def test_interrupt_while_waiting_ends_the_turn_at_once(api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    send_until_waiting(api, sid, "run: echo never")
    began = time.monotonic()
    stopped = api.post(f"/sessions/{sid}/interrupt")
    took = time.monotonic() - began
    assert stopped.status_code == 200 and stopped.json()["interrupted"] is True
    assert stopped.json()["state"] == "active"
    assert took < 1.0, took
    message = api.get(f"/sessions/{sid}").json()["messages"][-1]
    assert message["stop_reason"] == "interrupted"
    assert message["content"][1]["is_error"] is True
    assert "interrupted while awaiting approval" in message["content"][1]["content"]
    # The session takes messages again.
    assert api.post(f"/sessions/{sid}/messages", json=text_message("hi")).status_code == 200


def test_a_grant_decides_only_with_the_approve_scope(api: httpx.Client) -> None:
    sid = session_with(api, ASK_BASH)
    [pending] = send_until_waiting(api, sid, "run: echo granted")["pending_approvals"]
    plain = api.post(f"/sessions/{sid}/grants", json={}).json()
    assert "approve" not in plain["scopes"]
    approver = api.post(f"/sessions/{sid}/grants", json={"scopes": ["read", "approve"]}).json()
    url = f"/sessions/{sid}/approvals/{pending['tool_use_id']}"
    body = {"decision": "allow"}
    refused = api.post(url, json=body, headers={"Authorization": f"Bearer {plain['token']}"})
    assert refused.status_code == 403 and refused.json()["code"] == "outside_grant"
    allowed = api.post(url, json=body, headers={"Authorization": f"Bearer {approver['token']}"})
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["decided_by"].startswith("grant:")
    assert wait_state(api, sid, "active")["messages"][-1]["content"][1]["content"] == "granted\n"


@pytest.mark.parametrize("wire", ["anthropic", "openai"])
def test_two_calls_in_one_response_one_allowed_one_denied(
    api: httpx.Client, fake_llm: FakeLLM, wire: str
) -> None:
    model = f"approvals-{wire}-{time.monotonic_ns()}"
    stream = anthropic_stream if wire == "anthropic" else openai_stream
    calls = (
        ("tool", "call_one", "bash", {"command": "echo first"}),
        ("tool", "call_two", "bash", {"command": "echo second"}),
    )
    fake_llm.script(
        model,
        Reply(chunks=stream(*calls, stop="tool_use" if wire == "anthropic" else "tool_calls")),
        Reply(chunks=stream(("text", ["one ran, ", "one did not"]))),
    )
    sid = session_with(api, {"provider": wire, "model": model, **ASK_BASH})
    waiting = send_until_waiting(api, sid, "run both")
    assert [p["tool_use_id"] for p in waiting["pending_approvals"]] == ["call_one", "call_two"]
    assert decide(api, sid, "call_two", "deny", "second is not needed").json()["state"] == (
        "awaiting_approval"
    )
    assert decide(api, sid, "call_one", "allow").json()["state"] == "running"
    message = wait_state(api, sid, "active")["messages"][-1]
    results = [b for b in message["content"] if b["type"] == "tool_result"]
    assert results[0] == {
        "type": "tool_result",
        "tool_use_id": "call_one",
        "content": "first\n",
        "is_error": False,
    }
    assert results[1]["is_error"] is True and "second is not needed" in results[1]["content"]
    # The model was told both outcomes in its own format.
    second_request = fake_llm.requests[model][1].body
    sent = str(second_request["messages"])
    assert "first\\n" in sent and "second is not needed" in sent


def _log(api: httpx.Client, sid: str) -> list[dict[str, Any]]:
    reader = StreamReader(api, sid, params={"after": "0"})
    return reader.join(10)


# ---- restarts -----------------------------------------------------------------------


def test_waiting_turns_survive_sigkill_of_every_process(
    make_stack: Callable[..., Stack],
) -> None:
    # A reaper that looks often and ends queued turns after 1 s must leave
    # waiting turns alone.
    stack = make_stack(reaper_interval_seconds="0.2", queued_turn_timeout_seconds="1")
    with stack.client() as client:
        allow_sid = session_with(client, ASK_BASH)
        deny_sid = session_with(client, ASK_BASH)
        late_sid = session_with(client, {**ASK_BASH, "approval_timeout_seconds": 1})
        to_allow = send_until_waiting(client, allow_sid, "run: echo survived")
        to_deny = send_until_waiting(client, deny_sid, "run: echo refused")
        send_until_waiting(client, late_sid, "run: echo expired")
    stack.workers[0].stop(signal.SIGKILL)
    stack.api.stop(signal.SIGKILL)
    time.sleep(1.2)  # the third session's deadline passes while nothing runs
    stack.start_api(stack.port)
    stack.start_worker()
    with stack.client() as client:
        for sid in (allow_sid, deny_sid):
            assert client.get(f"/sessions/{sid}").json()["state"] == "awaiting_approval"
        call = to_allow["pending_approvals"][0]["tool_use_id"]
        assert decide(client, allow_sid, call, "allow").status_code == 200
        call = to_deny["pending_approvals"][0]["tool_use_id"]
        assert decide(client, deny_sid, call, "deny", "after the restart").status_code == 200
        allowed = wait_state(client, allow_sid, "active")["messages"][-1]["content"][1]
        assert allowed["content"] == "survived\n"
        denied = wait_state(client, deny_sid, "active")["messages"][-1]["content"][1]
        assert denied["is_error"] and "after the restart" in denied["content"]
        late = wait_state(client, late_sid, "active")["messages"][-1]["content"][1]
        assert late["is_error"] and "timed out" in late["content"]


def test_waiting_turn_memory_and_decision_latency(
    one_slot: Stack, api: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a waiting turn keeps in Redis, and how soon after a decision its tool
    starts: the tool prints the time it started (`bench/approvals.py` does 20)."""
    client = redis.Redis.from_url(one_slot.env["SANDSTREAM_REDIS_URL"])
    latencies = []
    memory = 0
    for i in range(5):
        sid = session_with(api, ASK_BASH)
        [pending] = send_until_waiting(api, sid, "run: date +%s.%N")["pending_approvals"]
        if i == 0:
            memory = sum(
                int(client.memory_usage(key) or 0)
                for key in (keys.suspended(sid), keys.approvals(sid))
            )
        sent = time.time()
        decide(api, sid, pending["tool_use_id"], "allow")
        started = wait_state(api, sid, "active")["messages"][-1]["content"][1]["content"]
        latencies.append(float(started) - sent)
    client.close()
    p50 = statistics.median(latencies) * 1000
    with capsys.disabled():
        print(f"\nwaiting turn: {memory} B in Redis; decision to tool start p50 {p50:.1f} ms")
    assert memory < 16_384
    assert p50 < 2000
