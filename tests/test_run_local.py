"""`make run` (scripts/run-local.sh) on a machine without bubblewrap: the service
comes up for local use, says loudly that tools run unisolated, and its Redis
still requires a password."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ROOT
from helpers import free_port, new_session, text_message


@pytest.fixture
def path_without_bubblewrap(tmp_path: Path) -> str:
    """A PATH holding every command of this machine's but bwrap."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"):
        if not Path(directory).is_dir():
            continue
        for entry in Path(directory).iterdir():
            link = shadow / entry.name
            if entry.name != "bwrap" and not link.exists():
                link.symlink_to(entry)
    return str(shadow)


@pytest.fixture
def local_run(path_without_bubblewrap: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDSTREAM_")}
    env.update(PATH=path_without_bubblewrap, SANDSTREAM_PORT=str(port))
    output = tmp_path / "run.log"
    with output.open("wb") as log:
        proc = subprocess.Popen(
            [str(ROOT / "scripts" / "run-local.sh")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", output
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_make_run_works_without_bubblewrap_and_says_so(local_run: tuple[str, Path]) -> None:
    base, output = local_run
    deadline = time.monotonic() + 60
    while True:
        text = output.read_text(errors="replace")
        if "sandbox isolation" in text and "API key:" in text:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.2)
    assert "bubblewrap (bwrap) is not installed" in text
    assert "tools run UNISOLATED on this host" in text
    key = re.search(r"API key: (\S+)", text).group(1)  # type: ignore[union-attr]
    with httpx.Client(
        base_url=base + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        sid = new_session(client)
        reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: echo local"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["content"][1]["content"] == "local\n"
    # Its Redis takes no command without the password, which is in no log.
    conf = (ROOT / ".sandstream" / "redis.conf").read_text()
    redis_port = int(re.search(r"^port (\d+)$", conf, re.MULTILINE).group(1))  # type: ignore[union-attr]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=redis_port).ping()
    password = (ROOT / ".sandstream" / "redis-password").read_text().strip()
    assert redis.Redis(port=redis_port, password=password).ping()
    assert password not in output.read_text(errors="replace")
