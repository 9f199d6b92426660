"""Small helpers the end-to-end tests share."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from arq.jobs import Job
from httpx_sse import connect_sse

from shared import events as ev
from shared import keys
from shared.queue import TURN_FUNCTION, connect, deserialize_job_data
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox
from shared.turns import failed, new_turn_ids
from worker.tools import TOOLS, ToolContext, ToolOutcome, execute_tool

T = TypeVar("T")

TERMINAL = {"session_completed", "session_failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_session(client: httpx.Client) -> str:
    """A fresh sandbox with one session in it; the session's id."""
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    return str(client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"])


def session_with(client: httpx.Client, agent: dict[str, Any]) -> str:
    """A fresh sandbox with one session of this `agent`; the session's id."""
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    created = client.post(f"/sandboxes/{sandbox}/sessions", json={"agent": agent})
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def wait_state(client: httpx.Client, sid: str, state: str, timeout: float = 15) -> dict[str, Any]:
    """Poll the session until it is in `state`; the session then."""
    deadline = time.monotonic() + timeout
    while True:
        session: dict[str, Any] = client.get(f"/sessions/{sid}").json()
        if session["state"] == state:
            return session
        assert time.monotonic() < deadline, f"session stayed {session['state']}"
        time.sleep(0.05)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` until it holds; its value then. Fails, naming `what`, after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def run_in_sandbox(client: httpx.Client, sid: str, command: str) -> dict[str, Any]:
    """The tool_result of `command`, run by the demo agent in the session's sandbox."""
    reply = client.post(f"/sessions/{sid}/messages", json=text_message(f"run: {command}"))
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()["content"][1]
    assert result["type"] == "tool_result"
    return result


def run_raw_job(redis_url: str, payload: Any, job_id: str) -> Any:
    """Queue a turn job with any payload, as arq would carry it, and return its result."""

    async def run() -> Any:
        redis = await connect(redis_url)
        try:
            await redis.enqueue_job(TURN_FUNCTION, payload, _job_id=job_id, _queue_name=keys.QUEUE)
            await redis.publish(keys.WAKE_CHANNEL, job_id)
            job = Job(job_id, redis, _queue_name=keys.QUEUE, _deserializer=deserialize_job_data)
            return await job.result(timeout=10)
        finally:
            await redis.aclose()

    return asyncio.run(run())


def text_message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


# An agent whose bash calls each wait for a person's decision.
ASK_BASH = {"permissions": {"bash": "ask"}}


def send_until_waiting(client: httpx.Client, sid: str, text: str) -> dict[str, Any]:
    """Send a message whose turn asks for approval; the 202 it answers with."""
    reply = client.post(f"/sessions/{sid}/messages", json=text_message(text))
    assert reply.status_code == 202, reply.text
    body: dict[str, Any] = reply.json()
    assert body["state"] == "awaiting_approval"
    return body


def decide(
    client: httpx.Client, sid: str, call_id: str, decision: str, reason: str = ""
) -> httpx.Response:
    """Allow or deny one tool call of the session's waiting turn."""
    return client.post(
        f"/sessions/{sid}/approvals/{call_id}", json={"decision": decision, "reason": reason}
    )


class StreamReader:
    """Reads a session's SSE stream in a thread until `until` terminal events arrived."""

    def __init__(
        self,
        client: httpx.Client,
        sid: str,
        *,
        until: int = 1,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        keep_keepalives: bool = False,
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.ids: list[str] = []
        self.keepalives: list[tuple[str, dict[str, Any]]] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None
        self._args = (client, sid, until, headers or {}, params or {}, keep_keepalives)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.opened.wait(10), "stream did not open"

    def _run(self) -> None:
        client, sid, until, headers, params, keep_keepalives = self._args
        terminals = 0
        try:
            with connect_sse(
                client, "GET", f"/sessions/{sid}/stream", headers=headers, params=params
            ) as source:
                self.status = source.response.status_code
                self.opened.set()
                for sse in source.iter_sse():
                    if not sse.data:  # a `retry:` hint alone dispatches nothing
                        continue
                    if sse.event == "keepalive":
                        self.keepalives.append((sse.id, json.loads(sse.data)))
                        if keep_keepalives and len(self.keepalives) >= 2:
                            return
                        continue
                    self.events.append(json.loads(sse.data) | {"_event": sse.event})
                    self.ids.append(sse.id)
                    if sse.event in TERMINAL:
                        terminals += 1
                        if terminals >= until:
                            return
        except BaseException as exc:  # reported by join()
            self.error = exc
            self.opened.set()

    def join(self, timeout: float = 30) -> list[dict[str, Any]]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream still open; got {self.events}"
        if self.error is not None:
            raise self.error
        return self.events


class ResumingReader:
    """A client that keeps following a session's stream across API processes.

    When a stream ends or breaks it reconnects (to the next base URL) with
    `Last-Event-ID`, as a browser's EventSource would.
    """

    def __init__(self, bases: list[str], key: str, sid: str, *, until: int) -> None:
        self.bases = bases
        self.key = key
        self.sid = sid
        self.until = until
        self.events: list[dict[str, Any]] = []
        self.reconnects = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        terminals = 0
        attempt = 0
        while not self._stop.is_set() and terminals < self.until:
            base = self.bases[attempt % len(self.bases)]
            headers = {"Authorization": f"Bearer {self.key}"}
            if self.events:
                headers["Last-Event-ID"] = str(self.events[-1]["seq"])
            else:
                headers["Last-Event-ID"] = "0"
            try:
                with (
                    httpx.Client(base_url=base + "/api/v1", timeout=30) as client,
                    connect_sse(
                        client, "GET", f"/sessions/{self.sid}/stream", headers=headers
                    ) as source,
                ):
                    if source.response.status_code != 200:
                        raise RuntimeError(f"stream answered {source.response.status_code}")
                    for sse in source.iter_sse():
                        if not sse.data or sse.event in {"keepalive", "reconnect"}:
                            continue
                        event = json.loads(sse.data) | {"_event": sse.event}
                        event["_at"] = time.monotonic()
                        self.events.append(event)
                        if sse.event in TERMINAL:
                            terminals += 1
                            if terminals >= self.until:
                                return
            except (httpx.HTTPError, RuntimeError):
                pass
            attempt += 1
            self.reconnects += 1
            time.sleep(0.2)

    def join(self, timeout: float = 60) -> list[dict[str, Any]]:
        self._thread.join(timeout)
        self._stop.set()
        assert not self._thread.is_alive(), f"still reading; got {len(self.events)} events"
        return self.events


class Box:
    """A sandbox for tests of the tools and the confinement, without the service.

    Each `call` opens it (as a turn would), runs one coroutine against it and
    closes it, in an event loop of its own."""

    def __init__(self, confinement: Confinement, spec: SandboxSpec) -> None:
        self.confinement = confinement
        self.spec = spec

    @property
    def workspace(self) -> Path:
        return self.spec.workspace

    @property
    def inside(self) -> str:
        """The workspace as the sandbox's processes see it."""
        return "/workspace" if self.confinement.kind == "bubblewrap" else str(self.workspace)

    def put(self, rel: str, content: str = "") -> Path:
        """A file in the workspace as the sandbox's own processes would have made it."""
        path = self.workspace / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        if self.spec.uid is not None:
            for made in [path, *path.relative_to(self.workspace).parents][:-1]:
                os.chown(
                    self.workspace / made if made != path else path, self.spec.uid, self.spec.uid
                )
        return path

    def call(self, work: Callable[[OpenSandbox], Awaitable[T]], *, file_timeout: float = 5) -> T:
        async def run() -> T:
            sandbox = OpenSandbox(self.confinement, self.spec, file_timeout=file_timeout)
            try:
                return await work(sandbox)
            finally:
                await sandbox.close()

        return asyncio.run(run())

    def tool(
        self, name: str, timeout: float = 5, output_cap: int = 200, **args: Any
    ) -> ToolOutcome:
        async def run(sandbox: OpenSandbox) -> ToolOutcome:
            ctx = ToolContext(sandbox=sandbox, timeout=timeout, output_cap=output_cap)
            return await execute_tool(ctx, name, args, list(TOOLS))

        return self.call(run)


class PausableProxy:
    """A TCP proxy to Redis on loopback that can stop passing bytes both ways,
    as a network partition would (connections stay open, nothing arrives), or
    drop the replies on a connection from the request that holds a marker on."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._marker = b""
        self.dropped = 0  # connections whose replies were dropped
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        muted: list[bool] = []  # the replies on this connection are dropped
        await asyncio.gather(
            self._pipe(reader, up_writer, muted, True),
            self._pipe(up_reader, writer, muted, False),
            return_exceptions=True,
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        muted: list[bool],
        requests: bool,
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if requests and self._marker and self._marker in data and not muted:
                    self._marker = b""
                    self.dropped += 1
                    muted.append(True)
                if not requests and muted:
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def drop_replies_to(self, marker: bytes) -> None:
        """Drop every reply on the next connection to send a request holding
        `marker`, from that request's on: it reaches Redis, its reply never
        comes back."""
        self._loop.call_soon_threadsafe(setattr, self, "_marker", marker)

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        self._thread.join(5)


def failed_event(sid: str, sandbox_id: str, turn_id: str) -> ev.SessionFailed:
    """A turn's terminal event, for the store's scripts that end it."""
    return failed(new_turn_ids(sid, sandbox_id, turn_id), "error", "x", "y")


def command_calls(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The calls of each Redis command between two `INFO commandstats` (those
    run inside scripts included), by name; commands not called, and INFO's own
    calls, left out."""
    calls = {
        name.removeprefix("cmdstat_"): after[name]["calls"]
        - before.get(name, {"calls": 0})["calls"]
        for name in after
    }
    return {name: n for name, n in calls.items() if n and name != "info"}
