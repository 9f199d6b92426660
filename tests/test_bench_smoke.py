"""The benchmark suite still runs (a quick pass; figures are not asserted here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        "7. files API",
        "8. files_changed",
        "10. replay",
    ):
        assert title in result.stdout
    assert "bare Litestar SSE" in result.stdout and "naive: arq" in result.stdout
    streaming = result.stdout.split("6. streaming", 1)[1].splitlines()
    rows = [line for line in streaming if line.startswith("10 turns")]
    assert len(rows) == 2 and all(line.rstrip().endswith("yes") for line in rows), streaming
