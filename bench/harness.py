"""Start a private Redis, an API and workers for a benchmark, and stop them after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from shared import keys
from shared.models import Message, Role, TextBlock, new_id, now_rfc3339
from shared.turns import TurnIds

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEY = "bench-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


@contextmanager
def private_redis() -> Iterator[str]:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sandstream-bench-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait(lambda: redis.Redis.from_url(url).ping(), "redis-server")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


class Service:
    def __init__(
        self, bases: list[str], api_pids: list[int], worker_pids: list[int], sandbox_root: str = ""
    ) -> None:
        self.sandbox_root = sandbox_root
        self.bases = bases
        self.base = bases[0] if bases else ""
        self.api_pids = api_pids
        self.worker_pids = worker_pids


@contextmanager
def service(
    redis_url: str, *, apis: int = 1, workers: int = 1, **settings: str
) -> Iterator[Service]:
    workdir = tempfile.mkdtemp(prefix="sandstream-bench-")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDSTREAM_")},
        "SANDSTREAM_REDIS_URL": redis_url,
        "SANDSTREAM_SANDBOX_ROOT": workdir,
        "SANDSTREAM_LOG_LEVEL": "WARNING",
        "SANDSTREAM_API_KEYS": f"bench={BENCH_KEY}",
        "SANDSTREAM_RATE_LIMIT_PER_MINUTE": "0",
        # One key opens every stream: past 600 a minute, streams would be told to
        # come back later (the streaming benchmark opens 500 per wire format).
        "SANDSTREAM_STREAM_CONNECTS_PER_MINUTE": "0",
        **{"SANDSTREAM_" + k.upper(): v for k, v in settings.items()},
    }
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    try:
        for _ in range(apis):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            api_env = {**env, "SANDSTREAM_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=api_env))
            _wait(lambda b=base: httpx.get(b + "/readyz").status_code == 200, "the API")
            bases.append(base)
        for _ in range(workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "worker"], cwd=ROOT, env=env))
        worker_pids = [p.pid for p in procs[apis:]]
        # A worker beats its heart once it has started, its provider's SDK
        # imported: before that, turns would wait in the queue, and the import's
        # seconds of CPU would be counted in what a benchmark measures.
        _wait(lambda: workers_beating(redis_url, worker_pids), "the workers", timeout=60)
        yield Service(bases, [p.pid for p in procs[:apis]], worker_pids, workdir)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def new_session(client: httpx.Client, body: dict[str, Any] | None = None) -> str:
    """A fresh sandbox with one session in it (created with `body`); its id."""
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    return str(client.post(f"/sandboxes/{sandbox}/sessions", json=body or {}).json()["id"])


def workers_beating(redis_url: str, pids: list[int]) -> bool:
    """Whether every worker process of `pids` has written its heartbeat."""
    client = redis.Redis.from_url(redis_url)
    try:
        beating = {
            int(client.hget(key, "pid") or 0)  # type: ignore[arg-type]
            for key in client.scan_iter(match=keys.worker("*"))
        }
    finally:
        client.close()
    return set(pids) <= beating


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def user_message(session_id: str, turn_id: str, text: str) -> Message:
    """The user message that opens turn `turn_id`, as the API stores it."""
    return _text_message("user", new_id(), session_id, turn_id, text)


def assistant_message(ids: TurnIds, text: str) -> Message:
    """The reply of the turn `ids` names, all text, as its end stores it."""
    return _text_message("assistant", ids.message_id, ids.session_id, ids.turn_id, text)


def _text_message(role: Role, message_id: str, session_id: str, turn_id: str, text: str) -> Message:
    return Message(
        id=message_id,
        session_id=session_id,
        role=role,
        content=[TextBlock(text=text)],
        timestamp=now_rfc3339(),
        turn_id=turn_id,
    )
