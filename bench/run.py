"""sandstream's benchmarks: every figure beside a baseline measured in the same run.

    python -m bench.run [--quick] [--streams 1000,10000]

Starts its own Redis, API and worker processes (the load generator shares the
machine) and prints one table per benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from arq.jobs import Job

from bench import streaming, turn_cost
from bench.appends import HEADER as APPENDS_HEADER
from bench.appends import bench_appends
from bench.file_tools import bench_file_tools
from bench.files_api import bench_files_changed, bench_transfers
from bench.harness import (
    AUTH,
    new_session,
    percentile,
    private_redis,
    service,
    user_message,
)
from bench.http_load import Connection, prepare
from bench.providers import HEADER as PROVIDERS_HEADER
from bench.providers import bench_providers
from bench.replay import bench_replay
from bench.sse_clients import bare_sse_server, open_streams
from shared import keys
from shared.approvals import ApprovalStore
from shared.models import new_id
from shared.queue import connect, deserialize_job_data
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings
from shared.store import SessionStore
from worker.event_writer import EventWriter
from worker.providers.demo import DemoProvider
from worker.turn import TurnRunner

MESSAGE = {"role": "user", "content": [{"type": "text", "text": "hello"}]}
TOOL_MESSAGE = {"role": "user", "content": [{"type": "text", "text": "run: true"}]}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


# ---- 1. blocking send latency ------------------------------------------------


def measure_sends(base: str, sends: int, message: dict[str, Any] = MESSAGE) -> list[float]:
    """Blocking sends from the lean keep-alive client (`bench/http_load.py`)."""
    with httpx.Client(base_url=base + "/api/v1", timeout=30, headers=AUTH) as client:
        sid = new_session(client)
    send = prepare(
        "POST",
        f"/api/v1/sessions/{sid}/messages",
        json.dumps(message).encode(),
        {**AUTH, "Content-Type": "application/json"},
    )

    async def run() -> list[float]:
        connection = await Connection.open(base)
        samples = []
        try:
            for i in range(sends + 10):
                started = time.perf_counter()
                status, reply = await connection.request(send)
                if i >= 10:
                    samples.append(time.perf_counter() - started)
                assert status == 200, reply
        finally:
            connection.close()
        return samples

    return asyncio.run(run())


def measure_sends_httpx(base: str, sends: int) -> list[float]:
    """The same from httpx, for what a common Python client adds on its side."""
    with httpx.Client(base_url=base + "/api/v1", timeout=30, headers=AUTH) as client:
        sid = new_session(client)
        for _ in range(10):
            client.post(f"/sessions/{sid}/messages", json=MESSAGE)
        samples = []
        for _ in range(sends):
            started = time.perf_counter()
            response = client.post(f"/sessions/{sid}/messages", json=MESSAGE)
            samples.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        return samples


def measure_naive(base: str, redis_url: str, sends: int) -> list[float]:
    """arq as its documentation has it: the worker polls every 0.5 s and the client
    waits with `Job.result` (which polls too). HTTP from the same lean client."""
    with httpx.Client(base_url=base + "/api/v1", timeout=30, headers=AUTH) as client:
        sid = new_session(client)
    headers = {**AUTH, "Content-Type": "application/json"}
    send = prepare(
        "POST", f"/api/v1/sessions/{sid}/messages?wait=0", json.dumps(MESSAGE).encode(), headers
    )
    fetch = prepare("GET", f"/api/v1/sessions/{sid}", b"", AUTH)

    async def run() -> list[float]:
        pool = await connect(redis_url)
        connection = await Connection.open(base)
        samples = []
        for _ in range(sends):
            started = time.perf_counter()
            status, reply = await connection.request(send)
            assert status == 202, reply
            job = Job(
                json.loads(reply)["turn_id"],
                pool,
                _queue_name=keys.QUEUE,
                _deserializer=deserialize_job_data,
            )
            await job.result(timeout=30)
            status, _ = await connection.request(fetch)
            assert status == 200
            samples.append(time.perf_counter() - started)
        connection.close()
        await pool.aclose()
        return samples

    return asyncio.run(run())


def measure_floor(redis_url: str, turns: int) -> list[float]:
    """The turn itself: claim, run with the demo agent, finish; no HTTP, no queue."""

    async def run() -> list[float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        store = SessionStore(client)
        settings = Settings(sandbox_root=str(Path("/tmp") / "sandstream-bench-floor"))
        sandbox = await store.create_sandbox("bench", {})
        workspace = prepare_workspace(settings.sandbox_root, sandbox.id, None, None)
        spec = SandboxSpec(sandbox_id=sandbox.id, workspace=workspace, uid=None, network=False)
        unconfined = Confinement(kind="none", settings=settings)
        session = await store.create_session("bench", sandbox.id, {}, settings.default_agent())
        writer = EventWriter(store)
        approvals = ApprovalStore(
            client,
            log_max_events=settings.log_max_events,
            log_ttl_seconds=settings.log_ttl_seconds,
        )
        samples = []
        for i in range(turns + 10):
            started = time.perf_counter()
            turn_id = new_id()
            user = user_message(session.id, turn_id, "hello")
            await store.claim_turn(session.id, "bench", turn_id, user)
            leased_at = time.monotonic()
            taken = await store.start_turn(session.id, turn_id, "bench")
            assert taken is not None
            runner = TurnRunner(
                store=store,
                approvals=approvals,
                writer=writer,
                settings=settings,
                provider=DemoProvider(),
                agent=settings.default_agent(),
                sandbox=OpenSandbox(unconfined, spec, file_timeout=5),
                worker_id="bench",
                session_id=session.id,
                sandbox_id=sandbox.id,
                turn_id=turn_id,
                history=taken.history,
            )
            await runner.run(leased_at)
            if i >= 10:
                samples.append(time.perf_counter() - started)
        await writer.close()
        await client.aclose()
        return samples

    return asyncio.run(run())


def bench_latency(redis_url: str, sends: int) -> None:
    floor = measure_floor(redis_url, sends)
    with service(redis_url) as svc:
        ours = measure_sends(svc.base, sends)
        ours_httpx = measure_sends_httpx(svc.base, sends)
        tool = measure_sends(svc.base, max(10, sends // 4), TOOL_MESSAGE)
    with service(redis_url, sandbox_idle_seconds="0") as svc:
        tool_cold = measure_sends(svc.base, max(10, sends // 4), TOOL_MESSAGE)
    with service(redis_url, worker_fast_pickup="false") as svc:
        naive = measure_naive(svc.base, redis_url, max(10, sends // 10))
    ours_p50 = percentile(ours, 0.5)
    rows = []
    for name, samples in [
        ("sandstream blocking send", ours),
        ("the same, client httpx", ours_httpx),
        ("floor: the turn in-process", floor),
        ("naive: arq 0.5 s poll + Job.result", naive),
        ("a tool turn (run: true), sandbox kept warm", tool),
        ("the same, sandbox closed after each turn", tool_cold),
    ]:
        p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
        rows.append([name, ms(p50), ms(p99), f"{p50 / ours_p50:.2f}x"])
    table(
        f"1. blocking send, plain demo reply, 1 client, {sends} sends "
        f"({max(10, sends // 4)} of the tool turn)",
        ["", "p50 ms", "p99 ms", "p50 vs ours"],
        rows,
    )
    print(f"  overhead over the floor, p50: {ms(ours_p50 - percentile(floor, 0.5))} ms")


# ---- 2. throughput ------------------------------------------------------------


def measure_throughput(bases: list[str], clients: int, seconds: float) -> float:
    body = json.dumps(MESSAGE).encode()

    async def client(index: int, done: list[int], deadline: float) -> None:
        base = bases[index % len(bases)]
        async with httpx.AsyncClient(base_url=base + "/api/v1", timeout=60, headers=AUTH) as c:
            sandbox = (await c.post("/sandboxes", json={})).json()["id"]
            sid = (await c.post(f"/sandboxes/{sandbox}/sessions", json={})).json()["id"]
        send = prepare(
            "POST",
            f"/api/v1/sessions/{sid}/messages",
            body,
            {**AUTH, "Content-Type": "application/json"},
        )
        connection = await Connection.open(base)
        try:
            while time.monotonic() < deadline:
                status, reply = await connection.request(send)
                assert status == 200, reply
                done[0] += 1
        finally:
            connection.close()

    async def run() -> float:
        done = [0]
        deadline = time.monotonic() + seconds
        started = time.monotonic()
        await asyncio.gather(*(client(i, done, deadline) for i in range(clients)))
        return done[0] / (time.monotonic() - started)

    return asyncio.run(run())


def bench_throughput(redis_url: str, clients: int, seconds: float) -> None:
    rows = []
    for apis, workers in [(1, 1), (2, 2)]:
        with service(redis_url, apis=apis, workers=workers) as svc:
            rate = measure_throughput(svc.bases, clients, seconds)
        rows.append([f"{apis} API + {workers} worker", f"{rate:.0f}"])
    table(
        f"2. throughput, {clients} clients, plain demo reply, {seconds:g} s", ["", "turns/s"], rows
    )


# ---- 3. SSE fan-out --------------------------------------------------------------


def bench_fanout(redis_url: str, counts: list[int]) -> None:
    """A demo turn appends 12 events (about 5.5 KB of frames); the bare endpoint
    gets a burst of 12 events of the same size, and the delivery of the last one
    (the turn's end) is timed at every client."""
    rows = []
    for count in counts:
        with service(redis_url) as svc:
            pid = svc.api_pids[0]
            with httpx.Client(base_url=svc.base + "/api/v1", timeout=60, headers=AUTH) as c:
                sid = new_session(c)
                url = f"{svc.base}/api/v1/sessions/{sid}/stream"

                def trigger(client: httpx.Client = c, session: str = sid) -> None:
                    client.post(f"/sessions/{session}/messages", json=MESSAGE)

                result = open_streams(url, AUTH, count, trigger, pid, event="session_completed")
        rows.append([f"sandstream, {count} streams", *result])
        with bare_sse_server() as (base, bare_pid):
            result = open_streams(
                base + "/stream",
                {},
                count,
                lambda b=base: httpx.post(b + "/publish", params={"burst": 12}),
                bare_pid,
                event="last",
            )
        rows.append([f"bare Litestar SSE, {count} streams", *result])
    table(
        "3. SSE fan-out: a turn's 12 events to every stream of one API process; the last one timed",
        ["", "delivery p50 ms", "delivery p99 ms", "KiB per idle stream"],
        rows,
    )


# ---- 4. idle cost ------------------------------------------------------------------


def idle_rate(url: str, seconds: float) -> float:
    client = redis.Redis.from_url(url)
    time.sleep(1.0)
    before = int(client.info("stats")["total_commands_processed"])
    time.sleep(seconds)
    after = int(client.info("stats")["total_commands_processed"])
    return (after - before - 1) / seconds


def bench_idle(redis_url: str, seconds: float) -> None:
    rows = []
    for name, kwargs in [
        ("sandstream worker", {"apis": 0, "workers": 1}),
        ("stock arq worker (0.5 s poll)", {"apis": 0, "workers": 1, "worker_fast_pickup": "false"}),
        ("sandstream API", {"apis": 1, "workers": 0}),
    ]:
        with service(redis_url, **kwargs):  # type: ignore[arg-type]
            rows.append([name, f"{idle_rate(redis_url, seconds):.2f}"])
    table(f"4. idle cost, Redis commands/s over {seconds:g} s", ["", "commands/s"], rows)


# ---- 5. file tools -----------------------------------------------------------------


def bench_files(calls: int) -> None:
    table(
        f"5. file tools: {calls} read_file calls of an 8 KiB file, after the first",
        ["", "first call ms", "p50 ms", "p99 ms"],
        bench_file_tools(calls),
    )


# ---- 6. streaming at scale ------------------------------------------------------------


def bench_stream(redis_url: str, counts: list[int], chunks: int, interval: float) -> None:
    table(
        f"6. streaming: N turns at once, each a model stream of {chunks} chunks, one per "
        f"{interval * 1000:g} ms; 1 API + 1 worker",
        streaming.HEADER,
        streaming.bench_streaming(redis_url, counts, ["openai", "anthropic"], chunks, interval),
    )


def bench_provider_reads(count: int, chunks: int, rounds: int) -> None:
    table(
        f"6d. the providers alone: {count} model streams at once of {chunks} chunks, one per "
        "20 ms; CPU of the reading process (items: what the provider handed over, tokens of "
        "one read joined)",
        PROVIDERS_HEADER,
        bench_providers(count, chunks, 0.02, rounds),
    )


def bench_turns(redis_url: str, count: int) -> None:
    table(
        f"6c. a turn's own cost: {count} turns at once of a {turn_cost.CHUNKS}-chunk model; "
        "1 API + 1 worker",
        turn_cost.HEADER,
        turn_cost.bench_turn_cost(redis_url, ["openai", "anthropic"], count),
    )


def bench_first_turns(redis_url: str, count: int, rounds: int, chunks: int) -> None:
    table(
        f"6e. a worker's first turns: {rounds} rounds of {count} turns at once on one "
        f"service, each a model stream of {chunks} chunks, one per 20 ms",
        streaming.HEADER,
        streaming.bench_first_turns(redis_url, count, rounds, chunks, 0.02),
    )


def bench_append_path(redis_url: str, count: int, rounds: int) -> None:
    table(
        f"6b. the append path: {count} turns, one text delta each per round, {rounds} rounds",
        APPENDS_HEADER,
        bench_appends(redis_url, count, rounds),
    )


# ---- 7. the files API ----------------------------------------------------------------


def bench_files_api(redis_url: str, megabytes: int, files: int, runs: int) -> None:
    table(
        f"7. files API: one {megabytes} MB file up and down, against cp",
        ["", "seconds", "MB/s", "API RSS +MB", "worker RSS +MB"],
        bench_transfers(redis_url, megabytes),
    )
    table(
        f"8. files_changed: a turn's snapshot and comparison, median of {runs}",
        ["workspace", "snapshot ms", "comparison ms", "snapshot KiB"],
        bench_files_changed(files, runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--streams", default="1000", help="comma-separated stream counts")
    parser.add_argument(
        "--only",
        default="latency,throughput,fanout,idle,files,streaming,turns,first_turns,appends,"
        "providers,files_api,replay",
        help="comma-separated benchmarks to run (latency, throughput, fanout, idle, files, "
        "streaming, turns, first_turns, appends, providers, files_api, replay)",
    )
    parser.add_argument(
        "--turns", default="20,200,500", help="comma-separated concurrent streaming turns"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    sends, clients, seconds, idle = (20, 8, 1.0, 1.0) if args.quick else (200, 64, 10.0, 20.0)
    counts = [int(n) for n in args.streams.split(",")] if not args.quick else [50]
    with private_redis() as url:
        if "latency" in only:
            bench_latency(url, sends)
        if "throughput" in only:
            bench_throughput(url, clients, seconds)
        if "fanout" in only:
            bench_fanout(url, counts)
        if "idle" in only:
            bench_idle(url, idle)
        if "streaming" in only:
            if args.quick:
                bench_stream(url, [10], 20, 0.02)
            else:
                bench_stream(url, [int(n) for n in args.turns.split(",")], 100, 0.02)
        if "turns" in only:
            bench_turns(url, 20 if args.quick else 200)
        if "first_turns" in only:
            bench_first_turns(url, *((5, 2, 20) if args.quick else (20, 3, 100)))
        if "appends" in only:
            bench_append_path(url, *((20, 10) if args.quick else (200, 100)))
        if "providers" in only:
            bench_provider_reads(*((10, 20, 1) if args.quick else (200, 100, 2)))
        if "files_api" in only:
            if args.quick:
                bench_files_api(url, 20, 1000, 3)
            else:
                bench_files_api(url, 200, 10_000, 10)
        if "replay" in only:
            table(
                "10. replay of a long log (64 KB tool results), one reading client",
                ["", "first event ms", "last event ms", "API RSS above idle MiB", "first vs base"],
                bench_replay(url, 10 if args.quick else 100),
            )
    if "files" in only:
        bench_files(20 if args.quick else 200)


if __name__ == "__main__":
    main()
