"""The benchmark suite still runs (a quick pass; figures are not asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_run_prints_every_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for title in (
        "1. blocking send",
        "2. throughput",
        "3. SSE fan-out",
        "4. idle cost",
        "5. file tools",
        "6. streaming",
        "6b. the append path",
        "6c. a turn's own cost",
        "6d. the providers alone",
        "6e. a worker's first turns",
        "7. files API",
        "8. files_changed",
        "10. replay",
    ):
        assert title in result.stdout
    assert "bare Litestar SSE" in result.stdout and "naive: arq" in result.stdout
    streaming = result.stdout.split("6. streaming", 1)[1].splitlines()
    rows = [line for line in streaming if line.startswith("10 turns")]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes") for line in rows), streaming


def test_bench_service_starts_its_workers_before_the_benchmark_runs(redis_url: str) -> None:
    """A benchmark that started while its worker was still importing the
    provider's SDK (seconds of CPU) counted that import as the worker's cost
    per chunk and made the first turns late."""
    from bench.harness import service
    from shared import keys

    client = redis.Redis.from_url(redis_url)
    with service(redis_url, workers=2, provider="anthropic", model="m") as svc:
        beating = {int(client.hget(k, "pid") or 0) for k in client.scan_iter(keys.worker("*"))}
        assert set(svc.worker_pids) <= beating
