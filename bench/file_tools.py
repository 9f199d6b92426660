"""What a file tool call costs now that it runs inside the sandbox.

`read_file` through the sandbox's file service (a request over a pipe to a
process under the sandbox's bubblewrap, uid and cgroup), against the path it
replaced: the worker reading the host file itself in a thread. The first call
of a turn also starts the service; that cost is shown on its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench.harness import percentile
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.handle import OpenSandbox
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings
from worker.tools import TOOLS, ToolContext, execute_tool

CONTENT = "".join(f"line {i}: some source code of a typical length\n" for i in range(200))


def _former_read(path: Path) -> str:
    """The former read_file: resolve the path and read it as the worker, in a thread."""
    return path.resolve().read_text(errors="replace")


async def _measure(confinement: Confinement, spec: SandboxSpec, calls: int) -> list[float]:
    sandbox = OpenSandbox(confinement, spec, file_timeout=30)
    ctx = ToolContext(sandbox=sandbox, timeout=30, output_cap=65536)
    samples = []
    try:
        for _ in range(calls + 1):
            started = time.perf_counter()
            outcome = await execute_tool(ctx, "read_file", {"path": "src.py"}, list(TOOLS))
            samples.append(time.perf_counter() - started)
            assert outcome.content == CONTENT
    finally:
        await sandbox.close()
    return samples


async def _measure_former(path: Path, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        text = await asyncio.to_thread(_former_read, path)
        samples.append(time.perf_counter() - started)
        assert text == CONTENT
    return samples


def bench_file_tools(calls: int) -> list[list[str]]:
    """Rows: (path, first call ms, p50 ms, p99 ms)."""
    root = Path(tempfile.mkdtemp(prefix="sandstream-bench-files-"))
    settings = Settings(sandbox_root=str(root))
    rows = []
    try:
        sandbox_id = str(uuid.uuid4())
        privileged = os.geteuid() == 0
        uid = 450_000 if privileged else None
        workspace = prepare_workspace(str(root), sandbox_id, uid, None)
        (workspace / "src.py").write_text(CONTENT)
        if uid is not None:
            os.chown(workspace / "src.py", uid, uid)
        spec = SandboxSpec(sandbox_id=sandbox_id, workspace=workspace, uid=uid, network=False)
        kinds: list[tuple[str, Confinement]] = []
        if shutil.which("bwrap"):
            confined = Confinement.detect(settings, "bench", networks=False)
            kinds.append(("file service, confined (bubblewrap, cgroup, seccomp)", confined))
        kinds.append(("file service, unconfined", Confinement(kind="none", settings=settings)))
        for name, confinement in kinds:
            samples = asyncio.run(_measure(confinement, spec, calls))
            first, rest = samples[0], samples[1:]
            rows.append(
                [
                    name,
                    f"{first * 1000:.1f}",
                    f"{percentile(rest, 0.5) * 1000:.3f}",
                    f"{percentile(rest, 0.99) * 1000:.3f}",
                ]
            )
            if confinement.cgroups is not None:
                confinement.cgroups.close()
        former = asyncio.run(_measure_former(workspace / "src.py", calls))
        rows.append(
            [
                "former: the worker reads the host file in a thread",
                "-",
                f"{percentile(former, 0.5) * 1000:.3f}",
                f"{percentile(former, 0.99) * 1000:.3f}",
            ]
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows
