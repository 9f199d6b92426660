"""A hostile agent against the real worker (root), bubblewrap, cgroups, a btrfs
disk quota, private networks and seccomp: every attack is contained.

The agent's tool calls are scripted through the local model server (OpenAI wire
format) or, for plain commands, given to the demo agent (`run: ...`). Each
attack is one that reached outside the sandbox before the tools ran inside it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from conftest import (
    ALPHA_KEY,
    ANTHROPIC_TEST_KEY,
    BETA_KEY,
    OPENAI_TEST_KEY,
    Stack,
    model_env,
    stack_of_its_own,
)
from fake_llm import FakeLLM, Reply, openai_stream
from helpers import run_in_sandbox as run
from helpers import text_message, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("mkfs.btrfs"),
    reason="needs root, bubblewrap and btrfs-progs",
)

DISK_BYTES = 64 << 20
MEMORY_BYTES = 256 << 20
MAX_PROCESSES = 64
SECRETS = (ANTHROPIC_TEST_KEY, OPENAI_TEST_KEY, ALPHA_KEY, BETA_KEY, "SANDSTREAM_", "REDIS")


@pytest.fixture(scope="module")
def btrfs_root() -> Iterator[Path]:
    """A btrfs filesystem of its own for the sandboxes, so quotas can be set."""
    workdir = Path(tempfile.mkdtemp(prefix="sandstream-btrfs-"))
    image, mount = workdir / "sandboxes.img", workdir / "mnt"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(2 << 30)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount / "root"
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile(redis_url: str, fake_llm: FakeLLM, btrfs_root: Path) -> Iterator[Stack]:
    env = {
        "SANDSTREAM_SANDBOX_ROOT": str(btrfs_root),
        "SANDSTREAM_SANDBOX_DISK_BYTES": str(DISK_BYTES),
        "SANDSTREAM_SANDBOX_MEMORY_BYTES": str(MEMORY_BYTES),
        "SANDSTREAM_SANDBOX_MAX_PROCESSES": str(MAX_PROCESSES),
        "SANDSTREAM_TOOL_TIMEOUT_SECONDS": "120",
        "SANDSTREAM_LOG_LEVEL": "INFO",
        **model_env(fake_llm),
    }
    with stack_of_its_own(redis_url, 13, env) as stack:
        yield stack


@pytest.fixture
def alpha(hostile: Stack) -> Iterator[httpx.Client]:
    with hostile.client(ALPHA_KEY) as client:
        client.timeout = httpx.Timeout(120)
        yield client


def _sandbox(client: httpx.Client, network: bool = False) -> str:
    response = client.post("/sandboxes", json={"network": network})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _session(client: httpx.Client, sandbox_id: str, agent: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"metadata": {}}
    if agent:
        body["agent"] = agent
    response = client.post(f"/sandboxes/{sandbox_id}/sessions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def scripted_turn(
    client: httpx.Client, fake_llm: FakeLLM, sid: str, model: str, calls: list[list[Any]]
) -> list[dict[str, Any]]:
    """One turn whose model makes the given tool calls (a list per response, each
    call `(name, input)`), then ends; the tool results, in order."""
    replies = []
    for response in calls:
        blocks = [("tool", f"call_{uuid.uuid4().hex[:10]}", name, args) for name, args in response]
        replies.append(Reply(chunks=openai_stream(*blocks, stop="tool_calls")))
    replies.append(Reply(chunks=openai_stream(("text", ["done"]))))
    fake_llm.script(model, *replies)
    reply = client.post(f"/sessions/{sid}/messages", json=text_message("go"))
    assert reply.status_code == 200, reply.text
    return [b for b in reply.json()["content"] if b["type"] == "tool_result"]


def py(script: str, *args: str) -> str:
    """A one-line command running a Python script in the sandbox (the demo agent
    runs the first line of a message)."""
    encoded = base64.b64encode(script.encode()).decode()
    return f"echo {encoded} | base64 -d > /tmp/s.py && python3 /tmp/s.py {' '.join(args)}"


def _model_session(client: httpx.Client, sandbox_id: str) -> tuple[str, str]:
    model = f"hostile-{uuid.uuid4().hex[:10]}"
    sid = _session(client, sandbox_id, {"provider": "openai", "model": model})
    return sid, model


def _workspace(stack: Stack, sandbox_id: str) -> Path:
    root = Path(stack.env["SANDSTREAM_SANDBOX_ROOT"])
    return root / sandbox_id


# ---- start-up ---------------------------------------------------------------------------


def test_start_up_log_states_the_isolation(hostile: Stack) -> None:
    deadline = time.monotonic() + 30
    while "sandbox isolation: seccomp" not in (log := hostile.workers[0].log.read_text()):
        assert time.monotonic() < deadline, log
        time.sleep(0.1)
    for line in (
        "tools run under bubblewrap as its own uid per sandbox",
        "network: a private namespace per network sandbox through slirp4netns",
        "cgroups: cgroup v",
        "quota: btrfs subvolume per sandbox with a qgroup limit",
        "seccomp: on",
    ):
        assert line in log, line
    assert "WARNING" not in "".join(ln for ln in log.splitlines() if "sandbox isolation" in ln)


# ---- the file tools: a symlink swapped in mid-call ------------------------------------


SWAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pairs = [(b"race/x", b"race/y"), (b"race/w", b"race/v"), (b"race/e", b"race/f")]
open("race/started", "w").close()
deadline = time.time() + 110
swaps = 0
while time.time() < deadline and not os.path.exists("race/stop"):
    for a, b in pairs:
        libc.renameat2(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
        swaps += 1
print(swaps)
"""


def test_symlink_swaps_never_carry_a_file_tool_outside_the_workspace(
    hostile: Stack, alpha: httpx.Client, fake_llm: FakeLLM
) -> None:
    sandbox = _sandbox(alpha)
    workspace = _workspace(hostile, sandbox)
    host_dir = hostile.workdir / "host-only"
    host_dir.mkdir(mode=0o700)
    host_file = host_dir / "target.txt"
    host_file.write_text("host original")
    before = host_file.stat()
    # x: a real directory with a file, exchanged with a link to /proc/self (the
    # file service's own environment); w: where writes go, exchanged with links
    # to the host's root-only directory and to /tmp; e: a file to edit, exchanged
    # with a link to the host's directory holding a file of the same name.
    setup = run(
        alpha,
        _session(alpha, sandbox),
        "mkdir -p race/x race/w race/e && echo SAFE > race/x/environ && "
        "echo original > race/e/target.txt && ln -s /proc/self race/y && "
        f"ln -s {host_dir} race/v && ln -s {host_dir} race/f && echo ready",
    )
    assert setup["content"] == "ready\n"
    swapper_sid = _session(alpha, sandbox)
    swapper = threading.Thread(target=lambda: run(alpha, swapper_sid, py(SWAPPER)), daemon=True)
    swapper.start()
    wait_until(lambda: (workspace / "race" / "started").exists(), 30, "the swapper to start")
    sid, model = _model_session(alpha, sandbox)
    calls = [
        [("read_file", {"path": "race/x/environ"})] * 100,
        [("write_file", {"path": f"race/w/pwned-{i}", "content": "pwned"}) for i in range(100)],
        [("edit_file", {"path": "race/e/target.txt", "old": "original", "new": "original"})] * 100,
        [("list_files", {"path": "race/x"})] * 50 + [("list_files", {"glob": "race/x/*"})] * 50,
    ]
    try:
        results = scripted_turn(alpha, fake_llm, sid, model, calls)
        reads, writes = results[:100], results[100:200]
        # On a loaded machine the swapper may not run while a whole batch of
        # reads (or writes) does: more batches, until both sides of the swap
        # were met by the reads and some write landed on the real directory.
        for _ in range(4):
            if {r["is_error"] for r in reads} == {True, False}:
                break
            reads += scripted_turn(alpha, fake_llm, sid, model, [calls[0]])
        for batch in range(1, 5):
            if not all(r["is_error"] for r in writes):
                break
            more = [
                ("write_file", {"path": f"race/w/pwned-{batch * 100 + i}", "content": "pwned"})
                for i in range(100)
            ]
            writes += scripted_turn(alpha, fake_llm, sid, model, [more])
    finally:
        (workspace / "race" / "stop").touch()
        swapper.join(60)
    assert len(results) == 400
    text = json.dumps(results + reads)
    for secret in SECRETS:
        assert secret not in text
    edits, lists = results[200:300], results[300:400]
    read_ok = [r for r in reads if not r["is_error"]]
    assert all(r["content"] == "SAFE\n" for r in read_ok)
    refused = [r for r in reads if r["is_error"]]
    assert all("outside the sandbox workspace" in r["content"] for r in refused)
    # The race really ran: both sides of the swap were met.
    assert read_ok and refused, (len(read_ok), len(refused))
    # Nothing was written or changed outside the workspace.
    assert list(host_dir.iterdir()) == [host_file]
    assert host_file.read_text() == "host original"
    assert host_file.stat().st_mtime_ns == before.st_mtime_ns
    written = [r for r in writes if not r["is_error"]]
    landed = {p.name for d in (workspace / "race").iterdir() if d.is_dir() for p in d.iterdir()}
    assert {f"pwned-{i}" for i, r in enumerate(writes) if not r["is_error"]} <= landed
    assert written and all("pwned" not in p.name for p in Path("/tmp").iterdir())
    assert all(not r["is_error"] or "outside" in r["content"] for r in edits)
    for r in lists:  # the real entry, or nothing (a walk does not follow the link)
        assert r["is_error"] or r["content"] in {"race/x/environ", "(empty)"}, r


# ---- special files and loops ---------------------------------------------------------------


def test_fifos_sockets_and_link_loops_hold_no_one_up(
    hostile: Stack, alpha: httpx.Client, fake_llm: FakeLLM
) -> None:
    sandbox = _sandbox(alpha)
    made = run(
        alpha,
        _session(alpha, sandbox),
        "for i in 1 2 3 4 5 6; do mkfifo fifo$i; done; "
        "python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'; "
        "mkdir loops && for i in 0 1 2 3 4 5 6 7; do ln -s . loops/l$i; done; echo made",
    )
    assert made["content"] == "made\n"
    sid, model = _model_session(alpha, sandbox)
    calls = [
        [("write_file", {"path": f"fifo{i}", "content": "x"}) for i in range(1, 7)]
        + [("read_file", {"path": f"fifo{i}"}) for i in range(1, 7)]
        + [("edit_file", {"path": "sock", "old": "a", "new": "b"})]
        + [("list_files", {"path": "loops", "glob": "**/*"})]
    ]
    other: dict[str, float] = {}

    def other_tenant() -> None:
        with hostile.client(BETA_KEY) as beta:
            beta_sid = _session(beta, _sandbox(beta))
            started = time.monotonic()
            assert run(beta, beta_sid, "echo fine")["content"] == "fine\n"
            other["seconds"] = time.monotonic() - started

    started = time.monotonic()
    results_box: list[list[dict[str, Any]]] = []
    hostile_turn = threading.Thread(
        target=lambda: results_box.append(scripted_turn(alpha, fake_llm, sid, model, calls))
    )
    hostile_turn.start()
    other_tenant()
    hostile_turn.join(60)
    results = results_box[0]
    assert time.monotonic() - started < 30
    assert other["seconds"] < 10
    for result in results[:13]:
        assert result["is_error"] and "not a regular file" in result["content"], result
    listing = results[13]
    assert not listing["is_error"] and "loops/l0" in listing["content"]
    # And the sandbox's own file tools still answer.
    after = scripted_turn(alpha, fake_llm, sid, model, [[("list_files", {"glob": "fifo1"})]])
    assert after[0]["content"] == "fifo1"


# ---- walls ------------------------------------------------------------------------------


def test_memory_wall_holds_and_names_itself(alpha: httpx.Client) -> None:
    sid = _session(alpha, _sandbox(alpha))
    hog = "python3 -c 'import time; x = b\"x\" * (150 << 20); time.sleep(3)'"
    result = run(alpha, sid, f"for i in 1 2 3 4; do {hog} & done; wait; echo finished")
    assert "Killed" in result["content"]
    assert "the sandbox's memory limit (0.25 GiB) was reached" in result["content"]


def test_process_wall_holds_and_names_itself(alpha: httpx.Client) -> None:
    sid = _session(alpha, _sandbox(alpha))
    result = run(alpha, sid, "for i in $(seq 1 200); do sleep 3 & done; wait")
    assert f"the sandbox's process limit ({MAX_PROCESSES}) was reached" in result["content"]
    assert run(alpha, sid, "echo after")["content"] == "after\n"


def test_disk_quota_holds_and_names_itself(
    hostile: Stack, alpha: httpx.Client, fake_llm: FakeLLM
) -> None:
    sandbox = _sandbox(alpha)
    sid = _session(alpha, sandbox)
    result = run(alpha, sid, "head -c 200000000 /dev/zero > big; ls -l big")
    assert "Disk quota exceeded" in result["content"]
    assert "the sandbox's disk quota (0.06 GiB) is full" in result["content"]
    size = (_workspace(hostile, sandbox) / "big").stat().st_size
    assert size <= DISK_BYTES  # refused at the limit, not after it
    model_sid, model = _model_session(alpha, sandbox)
    [written] = scripted_turn(
        alpha,
        fake_llm,
        model_sid,
        model,
        [[("write_file", {"path": "more", "content": "x" * 9000})]],
    )
    assert written["is_error"] and "disk quota" in written["content"]
    assert run(alpha, sid, "rm big && echo freed")["content"] == "freed\n"
    assert run(alpha, sid, "head -c 1000000 /dev/zero > small && echo ok")["content"] == "ok\n"


def test_sandboxes_never_share_a_uid(hostile: Stack, alpha: httpx.Client) -> None:
    uids = []
    with hostile.client(BETA_KEY) as beta:
        for client in (alpha, beta, alpha, beta):
            sandbox = _sandbox(client)
            uid = int(run(client, _session(client, sandbox), "id -u")["content"])
            assert _workspace(hostile, sandbox).stat().st_uid == uid
            uids.append(uid)
    assert len(set(uids)) == len(uids) and min(uids) >= 200_000


# ---- seccomp and /etc -------------------------------------------------------------------


def test_seccomp_refuses_new_user_namespaces(alpha: httpx.Client) -> None:
    sid = _session(alpha, _sandbox(alpha))
    result = run(alpha, sid, "unshare -U true; unshare -Ur id; unshare -n true; echo end")
    assert result["content"].count("Operation not permitted") == 3
    assert "uid=0" not in result["content"]


def test_ordinary_programs_find_what_they_need_in_etc(alpha: httpx.Client) -> None:
    sid = _session(alpha, _sandbox(alpha))
    result = run(
        alpha,
        sid,
        "whoami; getent passwd sandbox | cut -d: -f6; test -r /etc/resolv.conf && echo resolv; "
        "ls /etc/ssl/certs | grep -c pem; cat /etc/passwd | wc -l",
    )
    lines = result["content"].splitlines()
    assert lines[:3] == ["sandbox", "/workspace", "resolv"]
    assert int(lines[3]) > 10  # CA certificates
    assert int(lines[4]) == 3  # its own passwd, none of the host's users


# ---- networks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def internet() -> Iterator[str]:
    """A host in a network namespace of its own, standing in for the internet:
    198.51.100.2 serves HTTP; the host reaches it over a veth pair."""
    name = f"sstest-inet-{os.getpid()}"
    host_if, inet_if = f"ssh{os.getpid() % 100000}", f"ssi{os.getpid() % 100000}"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", inet_if],
        ["ip", "link", "set", inet_if, "netns", name],
        ["ip", "addr", "add", "198.51.100.1/24", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", name, "addr", "add", "198.51.100.2/24", "dev", inet_if],
        ["ip", "-n", name, "link", "set", inet_if, "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
    ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)
    site = Path(tempfile.mkdtemp(prefix="sandstream-inet-"))
    (site / "index.html").write_text("hello from the internet\n")
    server = subprocess.Popen(
        [
            *("ip", "netns", "exec", name, "python3", "-m", "http.server", "8080"),
            *("--bind", "198.51.100.2", "--directory", str(site)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get("http://198.51.100.2:8080/", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the internet did not come up"
            time.sleep(0.1)
    try:
        yield "http://198.51.100.2:8080/"
    finally:
        server.kill()
        server.wait()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        shutil.rmtree(site, ignore_errors=True)


PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "open")
    except OSError as exc:
        print(target, "refused:" + (exc.strerror or type(exc).__name__))
"""


def _tcp_probe(targets: list[tuple[str, int]]) -> str:
    """A command printing `host:port open|refused:<reason>` for each target."""
    return py(PROBE, *(f"{host}:{port}" for host, port in targets))


def test_a_network_sandbox_reaches_the_internet_and_nothing_of_the_host(
    hostile: Stack, alpha: httpx.Client, internet: str
) -> None:
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    open_port = listener.getsockname()[1]
    redis_port = urlparse(hostile.env["SANDSTREAM_REDIS_URL"]).port or 6379
    host_addresses = json.loads(
        subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, check=True).stdout
    )
    own = [
        a["local"]
        for link in host_addresses
        for a in link["addr_info"]
        if not a["local"].startswith("127.")
    ]
    targets = [
        ("127.0.0.1", hostile.port),
        ("127.0.0.1", redis_port),
        ("127.0.0.1", open_port),
        ("10.0.2.2", hostile.port),  # slirp's address for the host
        ("10.0.2.2", open_port),
        ("169.254.169.254", 80),  # cloud metadata
        *((address, open_port) for address in own),
    ]
    sid = _session(alpha, _sandbox(alpha, network=True))
    try:
        probes = run(alpha, sid, _tcp_probe(targets))["content"].splitlines()
        fetch = (
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())"
        )
        fetched = run(alpha, sid, py(fetch, internet))
    finally:
        listener.close()
    assert len(probes) == len(targets)
    assert all(" refused:" in line for line in probes), probes
    assert fetched["content"].startswith("hello from the internet"), fetched
    assert "198.51.100.1" in own  # the host's side of the veth is refused like any host address


def test_a_network_sandbox_resolves_names(alpha: httpx.Client) -> None:
    try:
        socket.getaddrinfo("pypi.org", 443)
    except OSError:
        pytest.skip("this host resolves no names")
    sid = _session(alpha, _sandbox(alpha, network=True))
    result = run(alpha, sid, "cat /etc/resolv.conf; getent hosts pypi.org | head -1")
    assert "nameserver 10.0.2.3" in result["content"]
    assert "pypi.org" in result["content"]


def test_a_sandbox_without_network_has_only_loopback(hostile: Stack, alpha: httpx.Client) -> None:
    sid = _session(alpha, _sandbox(alpha))
    result = run(
        alpha,
        sid,
        "python3 -c 'import socket; print([n for _, n in socket.if_nameindex()])'; "
        + _tcp_probe([("127.0.0.1", hostile.port)]),
    )
    assert result["content"].splitlines()[0] == "['lo']"
    assert " refused:" in result["content"]
