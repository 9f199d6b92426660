"""Streaming at scale: many concurrent turns of a real provider SDK streaming from
a paced model server, followed live by their SSE clients.

For each wire format and each N: N sessions each send one message; the model
(`bench/paced_model.py`, a process of its own) streams `chunks` stamped chunks
at one per `interval`; N raw SSE clients read the session streams. Baseline in
the same run: N raw clients reading the model server directly. Reported: the
latency of each chunk from the model writing it to the client reading it
(direct and through sandstream, and the difference), the turn's length against
the model's own, chunks/s, the worker's and the API's CPU per chunk (/proc),
Redis's CPU and commands per chunk (INFO), and whether every chunk arrived once
and in order.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import redis

from bench.harness import AUTH, ROOT, _wait, free_port, percentile, service
from bench.http_load import Connection, prepare

STAMP = re.compile(rb"(\d+)@(\d+\.\d+) ")
_TICK = os.sysconf("SC_CLK_TCK")
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@contextmanager
def paced_model(chunks: int, interval: float) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "bench.paced_model", str(port)]
    proc = subprocess.Popen([*args, "--chunks", str(chunks), "--interval", str(interval)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.post(base + "/nothing").status_code == 404, "the paced model")
        yield base
    finally:
        proc.terminate()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class Stream:
    """What one reader saw: the chunk indices in arrival order and their latencies."""

    indices: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ended_at: float = 0.0

    def take(self, line: bytes) -> None:
        now = time.time()
        for match in STAMP.finditer(line):
            self.indices.append(int(match.group(1)))
            self.latencies.append(now - float(match.group(2)))


async def _read_direct(base: str, wire: str) -> Stream:
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = b'{"model":"paced","stream":true}'
    writer.write(prepare("POST", PATHS[wire], body, {"Content-Type": "application/json"}))
    seen = Stream()
    while True:
        line = await reader.readline()
        if not line or line == b"0\r\n":
            break
        seen.take(line)
    seen.ended_at = time.time()
    writer.close()
    return seen


async def _open_session_stream(
    base: str, sid: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = [f"GET /api/v1/sessions/{sid}/stream?after=0 HTTP/1.1", "Host: bench"]
    head += ["Accept: text/event-stream"] + [f"{k}: {v}" for k, v in AUTH.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    while (await reader.readline()).strip():
        pass
    return reader, writer


async def _read_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Stream:
    seen = Stream()
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the stream ended before the turn did")
        if b'"type":"text_delta"' in line:
            seen.take(line)
        elif b'"type":"session_completed"' in line or b'"type":"session_failed"' in line:
            seen.ended_at = time.time()
            writer.close()
            return seen


@dataclass
class Run:
    direct: list[Stream]
    through: list[Stream]
    sent_at: list[float]
    seconds: float
    worker_cpu: float
    api_cpu: float
    redis_cpu: float
    redis_commands: int
    # Calls of each command over the run (INFO commandstats; those inside scripts too).
    redis_calls: dict[str, int] = field(default_factory=dict)


@dataclass
class _Counters:
    cpu: float
    commands: int
    calls: dict[str, int]


def _redis_counters(client: redis.Redis) -> _Counters:
    cpu = client.info("cpu")
    stats = client.info("stats")
    calls = {
        name.removeprefix("cmdstat_"): int(stat["calls"])
        for name, stat in client.info("commandstats").items()
    }
    return _Counters(
        float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        int(stats["total_commands_processed"]),
        calls,
    )


def measure(redis_url: str, model: str, wire: str, count: int) -> Run:
    return measure_rounds(redis_url, model, wire, count, 1)[0]


def measure_rounds(redis_url: str, model: str, wire: str, count: int, rounds: int) -> list[Run]:
    """`rounds` runs of `count` turns at once, one after the other on the same
    service (new sessions each time): the first is a fresh worker's first turns."""
    direct = asyncio.run(_direct_all(model, wire, count))
    os.environ.update(
        OPENAI_BASE_URL=model + "/v1",
        OPENAI_API_KEY="paced-key",
        ANTHROPIC_BASE_URL=model,
        ANTHROPIC_API_KEY="paced-key",
    )
    # The model is the service's default, so its SDK is loaded at start-up, as
    # in a deployment that uses it.
    settings = {"provider": wire, "model": "paced", "worker_max_jobs": str(max(count, 20))}
    runs = []
    with service(redis_url, **settings) as svc:
        counters = redis.Redis.from_url(redis_url)
        for _ in range(rounds):
            with httpx.Client(base_url=svc.base + "/api/v1", headers=AUTH, timeout=60) as client:
                sandbox = client.post("/sandboxes", json={}).json()["id"]
                agent = {"provider": wire, "model": "paced"}
                sids = [
                    client.post(f"/sandboxes/{sandbox}/sessions", json={"agent": agent}).json()[
                        "id"
                    ]
                    for _ in range(count)
                ]
            pids = svc.api_pids[0], svc.worker_pids[0]
            runs.append(asyncio.run(_through_all(svc.base, sids, *pids, counters, direct)))
    return runs


async def _direct_all(model: str, wire: str, count: int) -> list[Stream]:
    return await asyncio.gather(*(_read_direct(model, wire) for _ in range(count)))


async def _through_all(
    base: str,
    sids: list[str],
    api_pid: int,
    worker_pid: int,
    counters: redis.Redis,
    direct: list[Stream],
) -> Run:
    streams = []
    for batch in range(0, len(sids), 100):
        streams += await asyncio.gather(
            *(_open_session_stream(base, s) for s in sids[batch : batch + 100])
        )
    readers = [asyncio.create_task(_read_session(r, w)) for r, w in streams]
    await asyncio.sleep(0.5)
    senders = [await Connection.open(base) for _ in range(min(16, len(sids)))]
    body = b'{"role":"user","content":[{"type":"text","text":"stream"}]}'
    headers = {**AUTH, "Content-Type": "application/json"}
    worker_before, api_before = cpu_seconds(worker_pid), cpu_seconds(api_pid)
    redis_before = _redis_counters(counters)
    started = time.time()
    sent_at = [0.0] * len(sids)

    async def send(index: int, connection: Connection) -> None:
        for i in range(index, len(sids), len(senders)):
            sent_at[i] = time.time()
            status, _ = await connection.request(
                prepare("POST", f"/api/v1/sessions/{sids[i]}/messages?wait=0", body, headers)
            )
            assert status == 202, status

    await asyncio.gather(*(send(i, c) for i, c in enumerate(senders)))
    through = await asyncio.wait_for(asyncio.gather(*readers), 600)
    seconds = time.time() - started
    worker_cpu = cpu_seconds(worker_pid) - worker_before
    api_cpu = cpu_seconds(api_pid) - api_before
    redis_after = _redis_counters(counters)
    for connection in senders:
        connection.close()
    return Run(
        direct=direct,
        through=through,
        sent_at=sent_at,
        seconds=seconds,
        worker_cpu=worker_cpu,
        api_cpu=api_cpu,
        redis_cpu=redis_after.cpu - redis_before.cpu,
        redis_commands=redis_after.commands - redis_before.commands - 3,  # its INFO calls
        redis_calls={
            name: calls - redis_before.calls.get(name, 0)
            for name, calls in redis_after.calls.items()
            if name != "info" and calls > redis_before.calls.get(name, 0)
        },
    )


def row(run: Run, chunks: int, interval: float) -> list[str]:
    direct = [lat for s in run.direct for lat in s.latencies]
    through = [lat for s in run.through for lat in s.latencies]
    total = len(run.through) * chunks
    intact = all(s.indices == list(range(chunks)) for s in run.through + run.direct)
    model_seconds = (chunks - 1) * interval
    lengths = sorted(
        (s.ended_at - sent) / model_seconds
        for s, sent in zip(run.through, run.sent_at, strict=True)
    )
    ms = 1000
    return [
        f"{percentile(direct, 0.5) * ms:.1f} / {percentile(direct, 0.99) * ms:.1f}",
        f"{percentile(through, 0.5) * ms:.1f} / {percentile(through, 0.99) * ms:.1f}",
        f"{(percentile(through, 0.5) - percentile(direct, 0.5)) * ms:.1f} / "
        f"{(percentile(through, 0.99) - percentile(direct, 0.99)) * ms:.1f}",
        f"{percentile(lengths, 0.5):.2f} / {lengths[-1]:.2f}",
        f"{total / run.seconds:.0f}",
        f"{run.worker_cpu / total * 1e6:.0f}",
        f"{run.api_cpu / total * 1e6:.0f}",
        f"{run.redis_cpu / total * 1e6:.1f}",
        f"{run.redis_commands / total:.3f}",  # the target is 1.5: the third place tells
        f"{run.redis_calls.get('xadd', 0) / total:.2f} / "
        f"{run.redis_calls.get('publish', 0) / total:.2f}",
        "yes" if intact else "NO",
    ]


HEADER = [
    "",
    "direct p50/p99 ms",
    "sandstream p50/p99 ms",
    "added p50/p99 ms",
    "turn / model p50/max",
    "chunks/s",
    "worker µs/chunk",
    "API µs/chunk",
    "Redis µs/chunk",
    "Redis cmds/chunk",
    "of which XADD / PUBLISH",
    "all once, in order",
]


def bench_streaming(
    redis_url: str, counts: list[int], wires: list[str], chunks: int, interval: float
) -> list[list[str]]:
    rows = []
    with paced_model(chunks, interval) as model:
        for wire in wires:
            for count in counts:
                run = measure(redis_url, model, wire, count)
                rows.append([f"{count} turns, {wire}", *row(run, chunks, interval)])
    return rows


def bench_first_turns(
    redis_url: str, count: int, rounds: int, chunks: int, interval: float
) -> list[list[str]]:
    """`rounds` rounds of `count` turns on one service per wire format: the first
    round is a fresh worker's first turns, the others what follows them."""
    rows = []
    with paced_model(chunks, interval) as model:
        for wire in ("openai", "anthropic"):
            for n, run in enumerate(measure_rounds(redis_url, model, wire, count, rounds), 1):
                rows.append([f"round {n}, {count} turns, {wire}", *row(run, chunks, interval)])
    return rows
