"""The files API end to end: real API and worker processes, bubblewrap, its own uid
per sandbox, and a btrfs sandbox root with a disk quota (as in production)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from archives import CRAFTED, REPOSITORY, repository_tar, repository_zip
from conftest import ALPHA_KEY, BETA_KEY, Stack
from helpers import run_in_sandbox

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("mkfs.btrfs"),
    reason="needs root, bubblewrap and btrfs-progs",
)

DISK_BYTES = 256 << 20
UPLOAD_BYTES = 240 << 20
MB = 1 << 20


@pytest.fixture(scope="module")
def files_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("files-api")
    image, mount = workdir / "sandboxes.img", workdir / "mnt"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(2 << 30)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    url = redis_url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    env = {
        "SANDSTREAM_SANDBOX_ROOT": str(mount / "root"),
        "SANDSTREAM_SANDBOX_DISK_BYTES": str(DISK_BYTES),
        "SANDSTREAM_MAX_UPLOAD_BYTES": str(UPLOAD_BYTES),
        "SANDSTREAM_TOOL_TIMEOUT_SECONDS": "60",
    }
    stack = Stack(url, workdir / "stack", env)
    try:
        yield stack
    finally:
        stack.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def alpha(files_stack: Stack) -> Iterator[httpx.Client]:
    with files_stack.client(ALPHA_KEY) as client:
        client.timeout = httpx.Timeout(120)
        yield client


@pytest.fixture
def sandbox(alpha: httpx.Client) -> str:
    response = alpha.post("/sandboxes", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def run(client: httpx.Client, sandbox: str, command: str) -> str:
    """What `command` prints, run by the demo agent in a new session of the sandbox."""
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
    return str(run_in_sandbox(client, sid, command)["content"])


def _workspace(stack: Stack, sandbox: str) -> Path:
    return Path(stack.env["SANDSTREAM_SANDBOX_ROOT"]) / sandbox


def _problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


# ---- upload and download -------------------------------------------------------------------


def test_upload_then_download_is_byte_identical_for_text_and_binary(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    files = f"/sandboxes/{sandbox}/files"
    for path, data, media in [
        ("notes/hello.txt", "héllo wörld\n".encode(), "text/plain"),
        ("bin/blob.bin", bytes(range(256)) * 1000 + b"\0\r\n", "application/octet-stream"),
    ]:
        created = alpha.put(f"{files}/{path}", content=data)
        assert created.status_code == 201, created.text
        answer = created.json()
        assert answer["path"] == path and answer["type"] == "file"
        assert answer["size"] == len(data) and answer["sha256"] == hashlib.sha256(data).hexdigest()
        assert created.headers["etag"] == f'"{answer["sha256"]}"'
        assert answer["modified_at"].endswith("Z")
        got = alpha.get(f"{files}/{path}")
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"].startswith(media)
        assert got.headers["content-length"] == str(len(data))
        assert got.headers["etag"] == created.headers["etag"]
        assert got.headers["x-content-type-options"] == "nosniff"
    replaced = alpha.put(f"{files}/notes/hello.txt", content=b"again")
    assert replaced.status_code == 200 and replaced.json()["size"] == 5
    head = alpha.head(f"{files}/notes/hello.txt")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "5"
    uid = _workspace(files_stack, sandbox).stat().st_uid
    assert (_workspace(files_stack, sandbox) / "notes/hello.txt").stat().st_uid == uid


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _RssWatch:
    """The highest resident memory of some processes while a block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.idle = {pid: _rss(pid) for pid in pids}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _rss(pid))

    def __enter__(self) -> _RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self) -> dict[int, int]:
        return {pid: self.peak[pid] - self.idle[pid] for pid in self.pids}


def test_a_200_mb_file_round_trips_without_being_held_in_memory(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    blocks = 200

    def body() -> Iterator[bytes]:
        for i in range(blocks):
            yield hashlib.sha256(i.to_bytes(4, "big")).digest() * (MB // 32)

    expected = hashlib.sha256()
    for block in body():
        expected.update(block)
    alpha.get(f"/sandboxes/{sandbox}/files")  # a warm service, as a steady state has
    pids = [files_stack.api.popen.pid, files_stack.workers[0].popen.pid]
    with _RssWatch(pids) as watch:
        put = alpha.put(f"/sandboxes/{sandbox}/files/big.bin", content=body())
        assert put.status_code == 201, put.text
        assert put.json()["size"] == blocks * MB
        assert put.json()["sha256"] == expected.hexdigest()
        received = hashlib.sha256()
        size = 0
        with alpha.stream("GET", f"/sandboxes/{sandbox}/files/big.bin") as got:
            assert got.status_code == 200
            assert got.headers["content-length"] == str(blocks * MB)
            for chunk in got.iter_bytes():
                received.update(chunk)
                size += len(chunk)
    assert size == blocks * MB and received.hexdigest() == expected.hexdigest()
    assert all(grown < 50 * MB for grown in watch.growth().values()), watch.growth()


def test_ranges_follow_rfc_9110(alpha: httpx.Client, sandbox: str) -> None:
    url = f"/sandboxes/{sandbox}/files/range.bin"
    data = bytes(range(256)) * 4
    etag = alpha.put(url, content=data).headers["etag"]
    cases = [
        ("bytes=0-9", 206, data[0:10], "bytes 0-9/1024"),
        ("bytes=1000-", 206, data[1000:], "bytes 1000-1023/1024"),
        ("bytes=-4", 206, data[-4:], "bytes 1020-1023/1024"),
        ("bytes=1020-5000", 206, data[1020:], "bytes 1020-1023/1024"),
        ("bytes=0-1,5-6", 200, data, None),  # several ranges: the whole file
        ("lines=1-2", 200, data, None),  # a unit this server does not know
    ]
    for header, status, body, content_range in cases:
        got = alpha.get(url, headers={"Range": header})
        assert got.status_code == status, header
        assert got.content == body, header
        assert got.headers.get("content-range") == content_range, header
        assert got.headers["content-length"] == str(len(body))
    for unsatisfiable in ("bytes=1024-", "bytes=-0", "bytes=5-2", "bytes=x-1", "bytes=²-3"):
        refused = alpha.get(url, headers={"Range": unsatisfiable.encode()})
        _problem(refused, 416, "range_not_satisfiable")
        assert refused.headers["content-range"] == "bytes */1024"
    same = alpha.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert same.status_code == 206 and same.content == data[:4]
    other = alpha.get(url, headers={"Range": "bytes=0-3", "If-Range": '"0000"'})
    assert other.status_code == 200 and other.content == data


def test_etags_make_concurrent_writes_safe(alpha: httpx.Client, sandbox: str) -> None:
    url = f"/sandboxes/{sandbox}/files/shared.txt"
    first = alpha.put(url, content=b"v1", headers={"If-None-Match": "*"})
    assert first.status_code == 201
    _problem(
        alpha.put(url, content=b"v1 again", headers={"If-None-Match": "*"}),
        412,
        "precondition_failed",
    )
    etag = first.headers["etag"]
    second = alpha.put(url, content=b"v2", headers={"If-Match": etag})
    assert second.status_code == 200 and second.headers["etag"] != etag
    # A writer still holding the first version's tag loses.
    _problem(
        alpha.put(url, content=b"lost", headers={"If-Match": etag}), 412, "precondition_failed"
    )
    _problem(
        alpha.put(url, content=b"lost", headers={"If-Match": f"W/{second.headers['etag']}"}),
        412,
        "precondition_failed",
    )  # weak tags never match If-Match
    assert alpha.get(url).content == b"v2"
    assert alpha.get(url, headers={"If-None-Match": second.headers["etag"]}).status_code == 304
    assert alpha.get(url, headers={"If-None-Match": etag}).status_code == 200
    _problem(alpha.get(url, headers={"If-Match": etag}), 412, "precondition_failed")
    assert alpha.get(url, headers={"If-Match": f'"x", {second.headers["etag"]}'}).content == b"v2"
    _problem(
        alpha.put(
            f"/sandboxes/{sandbox}/files/absent.txt", content=b"x", headers={"If-Match": "*"}
        ),
        412,
        "precondition_failed",
    )


# ---- listing, deleting, errors -----------------------------------------------------------


def test_directories_list_with_recursion_and_paging(alpha: httpx.Client, sandbox: str) -> None:
    files = f"/sandboxes/{sandbox}/files"
    for path in ("a.txt", "src/b.py", "src/c.py", "src/pkg/d.py"):
        assert alpha.put(f"{files}/{path}", content=b"x").status_code == 201
    root = alpha.get(files)
    assert [(e["path"], e["type"]) for e in root.json()] == [("a.txt", "file"), ("src", "dir")]
    assert set(root.json()[0]) == {"path", "type", "size", "modified_at"}
    src = alpha.get(f"{files}/src").json()
    assert [e["path"] for e in src] == ["src/b.py", "src/c.py", "src/pkg"]
    seen: list[str] = []
    page = alpha.get(files, params={"recursive": "true", "limit": 2})
    while True:
        assert page.status_code == 200
        seen += [e["path"] for e in page.json()]
        if "x-next-cursor" not in page.headers:
            break
        params = {"recursive": "true", "limit": 2, "cursor": page.headers["x-next-cursor"]}
        page = alpha.get(files, params=params)
    assert seen == ["a.txt", "src", "src/b.py", "src/c.py", "src/pkg", "src/pkg/d.py"]
    _problem(alpha.get(files, params={"cursor": "!!"}), 400, "invalid_cursor")


def test_deleting_files_and_directories(alpha: httpx.Client, sandbox: str) -> None:
    files = f"/sandboxes/{sandbox}/files"
    alpha.put(f"{files}/dir/inner.txt", content=b"x")
    alpha.put(f"{files}/lone.txt", content=b"x")
    assert alpha.delete(f"{files}/lone.txt").status_code == 204
    _problem(alpha.get(f"{files}/lone.txt"), 404, "file_not_found")
    _problem(alpha.delete(f"{files}/dir"), 409, "directory_not_empty")
    assert alpha.delete(f"{files}/dir", params={"recursive": "true"}).status_code == 204
    _problem(alpha.delete(f"{files}/dir"), 404, "file_not_found")
    assert alpha.get(files).json() == []


def test_bad_paths_missing_files_and_oversized_uploads(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    files = f"/sandboxes/{sandbox}/files"
    for bad in ("a%00b", "%2E%2E/etc/passwd", "x/%2e%2e/%2e%2e/y"):
        for method in ("GET", "PUT", "DELETE"):
            body = _problem(
                alpha.request(method, f"{files}/{bad}", content=b"x"), 400, "invalid_path"
            )
            assert files_stack.env["SANDSTREAM_SANDBOX_ROOT"] not in body["detail"]
    _problem(alpha.get(f"{files}/nowhere.txt"), 404, "file_not_found")
    _problem(alpha.put(f"/sandboxes/{sandbox}/files", content=b"x"), 405, "method_not_allowed")
    # Refused on its Content-Length, before a byte of it is read.
    with socket.create_connection(("127.0.0.1", files_stack.port)) as raw:
        head = (
            f"PUT /api/v1{files}/huge.bin HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ALPHA_KEY}\r\nContent-Length: {UPLOAD_BYTES + 1}\r\n\r\n"
        )
        raw.sendall(head.encode())
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")

    def stream() -> Iterator[bytes]:
        for _ in range(UPLOAD_BYTES // MB + 1):
            yield b"\0" * MB

    _problem(alpha.put(f"{files}/huge.bin", content=stream()), 413, "body_too_large")
    _problem(alpha.get(f"{files}/nowhere.txt"), 404, "file_not_found")
    assert alpha.get(files).json() == []


def test_the_agent_and_the_api_share_the_files(alpha: httpx.Client, sandbox: str) -> None:
    files = f"/sandboxes/{sandbox}/files"
    alpha.put(f"{files}/script.sh", content=b"echo from-the-api\n")
    output = run(
        alpha,
        sandbox,
        "bash script.sh && echo 'echo from-the-agent' >> script.sh"
        " && echo made > made-by-agent.txt",
    )
    assert output == "from-the-api\n"
    assert alpha.get(f"{files}/script.sh").content == b"echo from-the-api\necho from-the-agent\n"
    assert alpha.get(f"{files}/made-by-agent.txt").content == b"made\n"
    assert alpha.delete(f"{files}/made-by-agent.txt").status_code == 204


# ---- links that lead out ----------------------------------------------------------------------


def test_links_leading_out_are_never_followed(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    secret = files_stack.workdir / "host-secret.txt"
    secret.write_text("host only")
    run(
        alpha,
        sandbox,
        f"mkdir d && ln -s /etc/passwd d/passwd && ln -s {secret} d/secret"
        " && ln -s ../.. d/up && echo ok > d/ok.txt",
    )
    files = f"/sandboxes/{sandbox}/files"
    for link in ("d/passwd", "d/secret", "d/up/x"):
        body = _problem(alpha.get(f"{files}/{link}"), 400, "invalid_path")
        assert "root:" not in body["detail"] and "host only" not in body["detail"]
    listing = {e["path"]: e["type"] for e in alpha.get(f"{files}/d").json()}
    assert listing == {
        "d/ok.txt": "file",
        "d/passwd": "symlink",
        "d/secret": "symlink",
        "d/up": "symlink",
    }
    archive = alpha.get(f"/sandboxes/{sandbox}/archive", params={"path": "d", "format": "tar"})
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tarred:
        members = {m.name: m for m in tarred.getmembers()}
        assert members["passwd"].issym() and members["secret"].linkname == str(secret)
        assert b"host only" not in archive.content and b"root:x:0" not in archive.content
    zipped = alpha.get(f"/sandboxes/{sandbox}/archive", params={"path": "d", "format": "zip"})
    assert b"host only" not in zipped.content and b"root:x:0" not in zipped.content


# ---- archives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tar.gz", "zip"])
def test_an_archive_of_a_repository_extracts_and_the_agent_sees_it(
    alpha: httpx.Client, sandbox: str, form: str
) -> None:
    archive = repository_zip() if form == "zip" else repository_tar()
    done = alpha.put(f"/sandboxes/{sandbox}/archive", params={"path": "work"}, content=archive)
    assert done.status_code == 200, done.text
    assert done.json()["path"] == "work" and done.json()["entries"] >= len(REPOSITORY)
    listing = run(alpha, sandbox, "ls -R work")
    for name in REPOSITORY:
        assert name.rsplit("/", 1)[-1] in listing
    assert run(alpha, sandbox, "cat work/repo/src/app.py") == "print('hello')\n"
    again = alpha.get(f"/sandboxes/{sandbox}/archive", params={"path": "work/repo", "format": form})
    assert again.status_code == 200
    assert again.headers["content-type"] in ("application/gzip", "application/zip")
    assert again.headers["content-disposition"] == f'attachment; filename="repo.{form}"'
    if form == "zip":
        with zipfile.ZipFile(io.BytesIO(again.content)) as zipped:
            assert zipped.read("src/app.py") == REPOSITORY["src/app.py"]
    else:
        with tarfile.open(fileobj=io.BytesIO(again.content)) as tarred:
            got = tarred.extractfile("data/blob.bin")
            assert got is not None and got.read() == REPOSITORY["data/blob.bin"]


@pytest.mark.parametrize(
    "kind",
    [
        "tar: a '..' name",
        "tar: an absolute name",
        "tar: a symlink climbing out",
        "tar: a symlink that climbs out through another link",
        "tar: a hard link to an absolute path",
        "tar: a character device",
        "zip: a '..' name",
        "zip: a symlink to an absolute path",
    ],
)
def test_a_crafted_archive_is_refused_with_422_naming_the_entry(
    alpha: httpx.Client, sandbox: str, files_stack: Stack, kind: str
) -> None:
    archive, entry = CRAFTED[kind]
    root = Path(files_stack.env["SANDSTREAM_SANDBOX_ROOT"])
    before = sorted(p.name for p in root.iterdir())
    refused = alpha.put(f"/sandboxes/{sandbox}/archive", params={"path": "x/y"}, content=archive)
    body = _problem(refused, 422, "archive_entry_refused")
    assert body["entry"] == entry and repr(entry) in body["detail"]
    assert alpha.get(f"/sandboxes/{sandbox}/files").json() == []
    assert sorted(p.name for p in root.iterdir()) == before


def test_archive_parameters_are_checked(alpha: httpx.Client, sandbox: str) -> None:
    archive = f"/sandboxes/{sandbox}/archive"
    _problem(alpha.get(archive, params={"format": "rar"}), 400, "invalid_parameter")
    _problem(alpha.get(archive, params={"path": "missing"}), 404, "file_not_found")
    _problem(alpha.put(archive, params={"path": "a/../.."}, content=b""), 400, "invalid_path")
    _problem(alpha.put(archive, content=b"not an archive at all"), 422, "invalid_archive")


# ---- the quota ----------------------------------------------------------------------------------


def test_the_quota_applies_to_uploads_and_archives(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    assert run(alpha, sandbox, "head -c 200000000 /dev/zero > filler && echo ok") == "ok\n"

    def zeros(megabytes: int) -> Iterator[bytes]:
        for _ in range(megabytes):
            yield b"\0" * MB

    _problem(
        alpha.put(f"/sandboxes/{sandbox}/files/more.bin", content=zeros(100)), 507, "quota_exceeded"
    )
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tarred:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 100 * MB
        tarred.addfile(info, io.BytesIO(b"\0" * info.size))
    _problem(
        alpha.put(
            f"/sandboxes/{sandbox}/archive", params={"path": "unpacked"}, content=bomb.getvalue()
        ),
        507,
        "quota_exceeded",
    )
    assert [e["path"] for e in alpha.get(f"/sandboxes/{sandbox}/files").json()] == ["filler"]
    assert alpha.delete(f"/sandboxes/{sandbox}/files/filler").status_code == 204
    assert alpha.put(f"/sandboxes/{sandbox}/files/more.bin", content=zeros(100)).status_code == 201


# ---- tenants ------------------------------------------------------------------------------------


def test_another_tenant_gets_404_on_every_endpoint(
    alpha: httpx.Client, sandbox: str, files_stack: Stack
) -> None:
    alpha.put(f"/sandboxes/{sandbox}/files/private.txt", content=b"alpha's")
    with files_stack.client(BETA_KEY) as beta:
        for method, path, params in [
            ("GET", "/files", {}),
            ("HEAD", "/files", {}),
            ("GET", "/files/private.txt", {}),
            ("HEAD", "/files/private.txt", {}),
            ("PUT", "/files/private.txt", {}),
            ("DELETE", "/files/private.txt", {}),
            ("PUT", "/archive", {"path": "x"}),
            ("GET", "/archive", {}),
        ]:
            answer = beta.request(
                method,
                f"/sandboxes/{sandbox}{path}",
                params=params,
                content=b"beta's" if method == "PUT" else None,
            )
            assert answer.status_code == 404, (method, path)
            if method != "HEAD":
                assert answer.json()["code"] == "sandbox_not_found"
    assert alpha.get(f"/sandboxes/{sandbox}/files/private.txt").content == b"alpha's"
    assert [e["path"] for e in alpha.get(f"/sandboxes/{sandbox}/files").json()] == ["private.txt"]


def test_deleting_a_sandbox_stops_its_file_services(
    alpha: httpx.Client, files_stack: Stack
) -> None:
    sandbox = alpha.post("/sandboxes", json={}).json()["id"]
    alpha.put(f"/sandboxes/{sandbox}/files/a.txt", content=b"x")
    uid = _workspace(files_stack, sandbox).stat().st_uid
    assert subprocess.run(["pgrep", "-u", str(uid)], capture_output=True).returncode == 0
    assert alpha.delete(f"/sandboxes/{sandbox}").status_code == 204
    assert not _workspace(files_stack, sandbox).exists()
    _problem(alpha.get(f"/sandboxes/{sandbox}/files"), 404, "sandbox_not_found")
    # Its idle file service is gone with it: nothing runs as its uid any more.
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-u", str(uid)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "a process of the deleted sandbox still runs"
        time.sleep(0.05)
