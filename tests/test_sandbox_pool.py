"""A worker keeps a sandbox's file service warm between the sandbox's turns, and
closes it once it has been idle for `SANDSTREAM_SANDBOX_IDLE_SECONDS`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from conftest import Stack
from helpers import new_session, run_in_sandbox


def _children(pid: int) -> set[int]:
    """The live child processes of `pid` (a sandbox's services, once its command ended)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_a_sandboxs_service_serves_its_next_turn_then_closes_when_idle(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(sandbox_idle_seconds="2")
    worker = stack.workers[0].popen.pid
    with stack.client() as client:
        sid = new_session(client)
        assert run_in_sandbox(client, sid, "echo one")["content"] == "one\n"
        kept = _children(worker)
        assert kept, "the sandbox's file service was closed with its turn"
        assert run_in_sandbox(client, sid, "echo two")["content"] == "two\n"
        assert _children(worker) == kept  # the same service, not a new one
        deadline = time.monotonic() + 10
        while _children(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _children(worker), "an idle sandbox outlived its idle time"
        # Closed, it starts again for the next turn.
        assert run_in_sandbox(client, sid, "echo three")["content"] == "three\n"
        assert _children(worker) and not _children(worker) & kept


def test_a_worker_keeps_no_more_than_its_cap_and_a_deleted_sandbox_goes(
    make_stack: Callable[..., Stack],
) -> None:
    """A tenant who runs a tool in many sandboxes cannot make the worker keep a
    service for each; and a sandbox deleted while its service is kept warm is
    deleted whole (its workspace too)."""
    stack = make_stack(sandbox_idle_max="2")
    worker = stack.workers[0].popen.pid
    with stack.client() as client:
        sids = [new_session(client) for _ in range(4)]
        kept: list[set[int]] = []
        for sid in sids:
            assert run_in_sandbox(client, sid, "echo hi")["content"] == "hi\n"
            kept.append(_children(worker))
        assert len(kept[0]) == 1  # one sandbox, one service
        deadline = time.monotonic() + 5
        while len(_children(worker)) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the oldest are closed as the newest are kept
        assert len(_children(worker)) == 2
        last = client.get(f"/sessions/{sids[-1]}").json()["sandbox_id"]
        workspace = stack.workdir / "sandboxes" / last
        assert workspace.is_dir()
        assert client.delete(f"/sandboxes/{last}").status_code == 204
        assert not workspace.exists()
