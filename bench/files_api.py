"""The files API's throughput and memory, and the cost of `files_changed`.

Throughput: one file uploaded and downloaded through real API and worker
processes (the bytes cross HTTP, the API and a pipe into the sandbox's file
service under bubblewrap), against `cp` of a file of the same size on the same
disk (the sandbox root's). Resident memory of the API and the worker while the
transfers run, against their idle size. The download is measured twice: the
first hashes the file for its ETag, the second finds the hash remembered.

files_changed: the file service's snapshot of a workspace of N files and the
comparison at a turn's end, each timed (median of several) inside the confined
service, as a turn pays them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bench.harness import AUTH, percentile, rss_bytes, service
from shared.sandbox import transfers
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings

MB = 1 << 20


class _Peak:
    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.idle = {pid: rss_bytes(pid) for pid in pids}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_bytes(pid))

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return {pid: self.peak[pid] - self.idle[pid] for pid in self.pids}


def _blocks(megabytes: int) -> Iterator[bytes]:
    for i in range(megabytes):
        yield hashlib.sha256(i.to_bytes(4, "big")).digest() * (MB // 32)


def _cp_seconds(root: Path, megabytes: int) -> float:
    source, target = root / "cp-source.bin", root / "cp-target.bin"
    with source.open("wb") as out:
        for block in _blocks(megabytes):
            out.write(block)
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    seconds = time.perf_counter() - started
    source.unlink()
    target.unlink()
    return seconds


def _curl(*args: str) -> None:
    result = subprocess.run(
        [
            "curl",
            "-s",
            "-f",
            "-o",
            "/dev/null",
            "-H",
            f"Authorization: {AUTH['Authorization']}",
            *list(args),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def bench_transfers(redis_url: str, megabytes: int) -> list[list[str]]:
    """Rows: (what, seconds, MB/s, API RSS growth, worker RSS growth). The
    client is curl (the server is what is measured), httpx where there is none."""
    rows = []
    with service(redis_url, max_upload_bytes=str((megabytes + 1) * MB)) as svc:
        root = Path(svc.sandbox_root)
        source = root / "upload-source.bin"
        with source.open("wb") as out:
            for block in _blocks(megabytes):
                out.write(block)
        with httpx.Client(base_url=svc.base + "/api/v1", headers=AUTH, timeout=600) as client:
            sandbox = client.post("/sandboxes", json={}).json()["id"]
            path = f"/sandboxes/{sandbox}/files/big.bin"
            url = f"{svc.base}/api/v1{path}"
            client.get(f"/sandboxes/{sandbox}/files")  # the sandbox's service, warm
            pids = [svc.api_pids[0], svc.worker_pids[0]]
            curl = shutil.which("curl") is not None

            def timed(what: str, work: Callable[[], None]) -> None:
                watch = _Peak(pids)
                started = time.perf_counter()
                work()
                seconds = time.perf_counter() - started
                growth = watch.stop()
                rows.append(
                    [
                        what,
                        f"{seconds:.2f}",
                        f"{megabytes / seconds:.0f}",
                        f"{growth[pids[0]] / MB:.1f}",
                        f"{growth[pids[1]] / MB:.1f}",
                    ]
                )

            def upload() -> None:
                if curl:
                    _curl("-T", str(source), url)
                    return
                with source.open("rb") as body:
                    answer = client.put(path, content=body)
                assert answer.status_code in (200, 201), answer.text

            def download() -> None:
                if curl:
                    _curl(url)
                    return
                with client.stream("GET", path) as got:
                    assert got.status_code == 200
                    for _ in got.iter_bytes(MB):
                        pass

            client_name = "curl" if curl else "httpx"
            timed(f"upload {megabytes} MB (PUT, {client_name})", upload)
            time.sleep(2.1)  # a file's hash is remembered once it is 2 s old
            timed(f"download {megabytes} MB (GET, hashed for its ETag)", download)
            timed(f"download {megabytes} MB (GET, hash remembered)", download)
        source.unlink()
        seconds = _cp_seconds(root, megabytes)
        baseline = f"baseline: cp of {megabytes} MB on the same disk"
        rows.append([baseline, f"{seconds:.2f}", f"{megabytes / seconds:.0f}", "-", "-"])
    return rows


async def _changes_cost(sandbox: OpenSandbox, files: list[Path], runs: int) -> dict[str, float]:
    limits = {"max_entries": 100_000, "max_seconds": 30.0, "max_bytes": 32 << 20}
    snapshots, comparisons = [], []
    size = 0
    for run in range(runs + 1):
        started = time.perf_counter()
        async with sandbox.files.channel() as channel:
            before = await transfers.snapshot(channel, **limits)
        middle = time.perf_counter()
        for path in files[run * 10 : run * 10 + 10]:
            path.write_text(f"changed in run {run}\n")
        again = time.perf_counter()
        async with sandbox.files.channel() as channel:
            found = await transfers.changes(channel, before, max_changes=1000, **limits)
        ended = time.perf_counter()
        assert len(found.changes) == 10, found.changes
        if run:  # the first run also starts the service
            snapshots.append(middle - started)
            comparisons.append(ended - again)
        size = len(before.blob)
    return {
        "snapshot": percentile(snapshots, 0.5),
        "changes": percentile(comparisons, 0.5),
        "blob": size,
    }


def bench_files_changed(count: int, runs: int) -> list[list[str]]:
    """Rows: (workspace, snapshot ms, comparison ms, snapshot KiB)."""
    root = Path(tempfile.mkdtemp(prefix="sandstream-bench-changes-"))
    settings = Settings(sandbox_root=str(root))
    confined = shutil.which("bwrap") is not None
    confinement = (
        Confinement.detect(settings, "bench", networks=False)
        if confined
        else Confinement(kind="none", settings=settings)
    )
    try:
        sandbox_id = str(uuid.uuid4())
        uid = 460_000 if confinement.privileged and confined else None
        workspace = prepare_workspace(str(root), sandbox_id, uid, None)
        files = []
        for i in range(count):
            path = workspace / f"dir{i % 100:02d}" / f"file{i:05d}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"file {i}\n")
            files.append(path)
        if uid is not None:
            for here, dirs, names in os.walk(workspace):
                for name in dirs + names:
                    os.chown(os.path.join(here, name), uid, uid)
        spec = SandboxSpec(sandbox_id=sandbox_id, workspace=workspace, uid=uid, network=False)

        async def measure() -> dict[str, float]:
            sandbox = OpenSandbox(confinement, spec, file_timeout=60)
            try:
                return await _changes_cost(sandbox, files, runs)
            finally:
                await sandbox.close()

        cost = asyncio.run(measure())
        finds = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run(["find", str(workspace), "-ls"], check=True, stdout=subprocess.DEVNULL)
            finds.append(time.perf_counter() - started)
    finally:
        if confinement.cgroups is not None:
            confinement.cgroups.close()
        shutil.rmtree(root, ignore_errors=True)
    where = "bubblewrap" if confined else "unconfined"
    return [
        [
            f"{count} files in 100 directories ({where})",
            f"{cost['snapshot'] * 1000:.1f}",
            f"{cost['changes'] * 1000:.1f}",
            f"{cost['blob'] / 1024:.0f}",
        ],
        [
            "baseline: find -ls of the same workspace",
            f"{percentile(finds, 0.5) * 1000:.1f}",
            "-",
            "-",
        ],
    ]
