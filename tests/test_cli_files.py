"""`sandstream files` and `sandstream archive` against a running API."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from conftest import ALPHA_KEY, ROOT, Stack


def _cli(
    stack: Stack, *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SANDSTREAM_URL": stack.base_url, "SANDSTREAM_API_KEY": ALPHA_KEY}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_files_put_ls_get_rm(stack: Stack, sandbox_id: str, tmp_path: Path) -> None:
    local = tmp_path / "data.bin"
    local.write_bytes(os.urandom(300_000))
    put = _cli(stack, "files", "put", sandbox_id, str(local), "dir/data.bin")
    assert put.returncode == 0, put.stderr
    assert b"dir/data.bin  300000 bytes  sha256 " in put.stdout
    piped = _cli(stack, "files", "put", sandbox_id, "-", "dir/notes.txt", stdin=b"from stdin\n")
    assert piped.returncode == 0, piped.stderr
    absent_only = _cli(
        stack, "files", "put", sandbox_id, "-", "dir/notes.txt", "--if-absent", stdin=b"again"
    )
    assert absent_only.returncode == 1 and absent_only.stderr.startswith(b"412: ")
    listing = _cli(stack, "files", "ls", sandbox_id, "-r").stdout.decode().splitlines()
    assert [line.split()[-1] for line in listing] == ["dir", "dir/data.bin", "dir/notes.txt"]
    assert listing[0].startswith("d ")
    target = tmp_path / "copy.bin"
    got = _cli(stack, "files", "get", sandbox_id, "dir/data.bin", str(target))
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == local.read_bytes()
    assert _cli(stack, "files", "get", sandbox_id, "dir/notes.txt", "-").stdout == b"from stdin\n"
    refused = _cli(stack, "files", "rm", sandbox_id, "dir")
    assert refused.returncode == 1 and b"409" in refused.stderr
    assert _cli(stack, "files", "rm", sandbox_id, "dir", "-r").returncode == 0
    assert _cli(stack, "files", "ls", sandbox_id).stdout == b""
    missing = _cli(stack, "files", "get", sandbox_id, "nothing.txt", str(tmp_path / "x"))
    assert missing.returncode == 1 and missing.stderr.startswith(b"404: ")


def test_archive_put_of_a_directory_and_get(stack: Stack, sandbox_id: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.py").write_text("print(1)\n")
    (project / "README.md").write_text("# project\n")
    put = _cli(stack, "archive", "put", sandbox_id, str(project), "--path", "checkout")
    assert put.returncode == 0, put.stderr
    assert b"into checkout" in put.stdout
    output = tmp_path / "out.tar.gz"
    got = _cli(stack, "archive", "get", sandbox_id, "--path", "checkout", "-o", str(output))
    assert got.returncode == 0, got.stderr
    with tarfile.open(output) as tarred:
        assert sorted(tarred.getnames()) == ["README.md", "src", "src/app.py"]
        app = tarred.extractfile("src/app.py")
        assert app is not None and app.read() == b"print(1)\n"
