"""Fixtures: a private Redis, and real API and worker processes.

Redis comes from `REDIS_URL` when set, else a testcontainers container when a
Docker engine answers, else a `redis-server` started here on a free port. The
machine's own Redis on 6379 is never touched.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fake_llm import FakeLLM
from helpers import Box, free_port

from shared import keys
from shared.sandbox.confinement import Confinement, SandboxSpec
from shared.sandbox.workspace import prepare_workspace
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# Chromium, the page server and the stack of the browser tests.
pytest_plugins = ("browser",)
ALPHA_KEY = "alpha-key-0123456789abcdef"
BETA_KEY = "beta-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
ANTHROPIC_TEST_KEY = "sk-ant-test-SECRET-key-0123456789"
OPENAI_TEST_KEY = "sk-test-SECRET-key-0123456789"


def _wait_for(
    check: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.log.read_text()[-2000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if _docker_answers():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        with DockerContainer("redis:7-alpine").with_exposed_ports(6379) as container:
            wait_for_logs(container, "Ready to accept connections")
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.exit("tests need Redis: set REDIS_URL, run Docker, or install redis-server", 2)
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for(lambda: bool(redis.Redis.from_url(url).ping()), 10, "redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class Proc:
    """A service process started by the tests, with its log kept for failures."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_file.close()


class Stack:
    """A running API and its workers, sharing one Redis and one sandbox root."""

    def __init__(
        self, redis_url: str, workdir: Path, extra_env: dict[str, str], workers: int = 1
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SANDSTREAM_")},
            "SANDSTREAM_REDIS_URL": redis_url,
            "SANDSTREAM_PORT": str(self.port),
            "SANDSTREAM_SANDBOX_ROOT": str(workdir / "sandboxes"),
            "SANDSTREAM_LOG_LEVEL": "WARNING",
            "SANDSTREAM_API_KEYS": f"alpha={ALPHA_KEY},beta={BETA_KEY}",
            "SANDSTREAM_ADMIN_KEYS": f"ops={ADMIN_KEY}",
            "SANDSTREAM_RATE_LIMIT_PER_MINUTE": "0",
            **extra_env,
        }
        self.procs: list[Proc] = []
        self.api = self._start("api")
        # API processes by port, so that one can be restarted where it was.
        self.apis: dict[int, Proc] = {self.port: self.api}
        _wait_for(self._ready, 30, "the API", self.api)
        self.workers = [self.start_worker() for _ in range(workers)]

    def _start(self, module: str) -> Proc:
        proc = Proc(
            [sys.executable, "-m", module],
            self.env,
            self.workdir / f"{module}-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        return proc

    def client(self, key: str = ALPHA_KEY) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url + "/api/v1",
            timeout=30,
            headers={"Authorization": f"Bearer {key}"},
        )

    def start_api(self, port: int | None = None) -> str:
        """Another API process on its own port (or on `port`); returns its base URL."""
        port = port or free_port()
        proc = Proc(
            [sys.executable, "-m", "api"],
            {**self.env, "SANDSTREAM_PORT": str(port)},
            self.workdir / f"api-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        self.apis[port] = proc
        base = f"http://127.0.0.1:{port}"
        _wait_for(
            lambda: httpx.get(base + "/readyz", timeout=1).status_code == 200, 30, "API", proc
        )
        return base

    def restart_api(self, port: int | None = None) -> None:
        """Stop the API process on `port` (the first API's by default) as a deploy
        would, with SIGTERM, and start a new one on the same port."""
        port = port or self.port
        self.apis[port].stop()
        self.start_api(port)
        if port == self.port:
            self.api = self.apis[port]

    def start_worker(self) -> Proc:
        """A worker, returned once its first heartbeat is in Redis: its signal
        handlers are in place by then, so a test may SIGTERM it at once, however
        loaded the machine. Gives up after 15 s, or when the worker exits."""
        worker = self._start("worker")
        mark = f":{worker.popen.pid}:"
        client = redis.Redis.from_url(
            self.env["SANDSTREAM_REDIS_URL"],
            password=self.env.get("SANDSTREAM_REDIS_PASSWORD") or None,
        )
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline and worker.popen.poll() is None:
                members = client.zrange(keys.WORKERS, 0, -1)
                if any(mark in member.decode() for member in members):
                    break
                time.sleep(0.05)
        except redis.RedisError:
            time.sleep(0.3)  # a Redis this client cannot reach (TLS): the old grace
        finally:
            client.close()
        return worker

    def _ready(self) -> bool:
        return httpx.get(self.base_url + "/readyz", timeout=1).status_code == 200

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    server = FakeLLM()
    server.start()
    yield server
    server.stop()


def model_env(fake_llm: FakeLLM) -> dict[str, str]:
    """The settings that point both providers' SDKs at the local fake model."""
    return {
        "ANTHROPIC_BASE_URL": fake_llm.base_url,
        "ANTHROPIC_API_KEY": ANTHROPIC_TEST_KEY,
        "OPENAI_BASE_URL": fake_llm.base_url + "/v1",
        "OPENAI_API_KEY": OPENAI_TEST_KEY,
    }


@contextmanager
def stack_of_its_own(redis_url: str, db: int, env: dict[str, str]) -> Iterator[Stack]:
    """An API and a worker with settings of their own, on a Redis database of
    their own (so their queue is apart from the shared stack's worker)."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="sandstream-test-"))
    running = Stack(url, workdir, env)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def one_slot_fixtures(db: int, tool_timeout_seconds: float) -> tuple[Any, Any]:
    """The `one_slot` and `api` fixtures of a test module: an API and one worker
    that runs one job at a time, on Redis database `db` (the module's own), and
    a client of that API. Assign both at the module's top level."""

    @pytest.fixture(scope="module", name="one_slot")
    def one_slot(redis_url: str, fake_llm: FakeLLM) -> Iterator[Stack]:
        env = {
            "SANDSTREAM_WORKER_MAX_JOBS": "1",
            "SANDSTREAM_REAPER_INTERVAL_SECONDS": "0.2",
            "SANDSTREAM_KEEPALIVE_SECONDS": "1",
            "SANDSTREAM_TOOL_TIMEOUT_SECONDS": str(tool_timeout_seconds),
            **model_env(fake_llm),
        }
        with stack_of_its_own(redis_url, db, env) as running:
            yield running

    @pytest.fixture(name="api")
    def api(one_slot: Stack) -> Iterator[httpx.Client]:
        with one_slot.client() as client:
            yield client

    return one_slot, api


@pytest.fixture(scope="session")
def stack(redis_url: str, fake_llm: FakeLLM) -> Iterator[Stack]:
    """One API and one worker for the whole run; each test makes its own sandbox."""
    workdir = Path(tempfile.mkdtemp(prefix="sandstream-test-"))
    env = {
        "SANDSTREAM_KEEPALIVE_SECONDS": "1",
        "SANDSTREAM_MAX_BODY_BYTES": str(256 * 1024),
        "SANDSTREAM_TOOL_TIMEOUT_SECONDS": "5",
        **model_env(fake_llm),
    }
    running = Stack(redis_url, workdir, env)
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """A client of tenant `alpha`."""
    with stack.client() as http:
        yield http


@pytest.fixture
def sandbox_id(client: httpx.Client) -> str:
    response = client.post("/sandboxes", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture
def session_id(client: httpx.Client, sandbox_id: str) -> str:
    response = client.post(f"/sandboxes/{sandbox_id}/sessions", json={"metadata": {}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture
def make_stack(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Start a stack of its own, for tests that kill processes or change settings."""
    started: list[Stack] = []

    def make(
        workers: int = 1,
        redis_url_override: str = "",
        env: dict[str, str] | None = None,
        **settings: str,
    ) -> Stack:
        # A database of its own keeps its queue away from the shared stack's worker.
        url = redis_url_override or redis_url.rsplit("/", 1)[0] + f"/{1 + len(started)}"
        redis.Redis.from_url(url).flushdb()
        extra = {"SANDSTREAM_" + k.upper(): v for k, v in settings.items()}
        extra.update(env or {})
        started.append(Stack(url, tmp_path / f"stack{len(started)}", extra, workers))
        return started[-1]

    yield make
    for running in started:
        running.stop()


@contextmanager
def nginx_proxy(api_ports: list[int], workdir: Path) -> Iterator[tuple[str, Path]]:
    """deploy/nginx/nginx.conf in front of the APIs on `api_ports`; only the
    upstream addresses, the port and the scratch paths differ from the shipped
    file. Yields the proxy's base URL and its log (error log included)."""
    port = free_port()
    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    upstreams = "\n        ".join(f"server 127.0.0.1:{p} max_fails=0;" for p in api_ports)
    for old, new in (
        ("server api:8000 resolve max_fails=0;", upstreams),
        ("listen 8080;", f"listen 127.0.0.1:{port};"),
        ("/tmp/", f"{workdir}/"),
    ):
        assert old in conf
        conf = conf.replace(old, new)
    path = workdir / "nginx.conf"
    path.write_text(conf)
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        pytest.fail("nginx is missing: scripts/ensure-tools.sh installs it")
    checked = subprocess.run([nginx, "-t", "-c", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    log_path = workdir / "nginx.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [nginx, "-c", str(path), "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200, 10, "nginx")
        yield base, log_path
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class RedisServer:
    """A redis-server of a test's own, optionally requiring a password (given on
    stdin, as the shipped configurations do) and extra config lines."""

    def __init__(
        self,
        workdir: Path,
        password: str = "",
        config: str = "",
        tls_ca: Path | None = None,
        username: str | None = None,
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.username = username
        self.password = password
        self.config = config
        self.tls_ca = tls_ca  # TLS only, clients verifying the server with this CA
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def client(self) -> redis.Redis:
        if self.tls_ca is not None:
            return redis.Redis(
                port=self.port,
                password=self.password or None,
                ssl=True,
                ssl_ca_certs=str(self.tls_ca),
            )
        return redis.Redis(port=self.port, username=self.username, password=self.password or None)

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        ports = ["port 0", f"tls-port {self.port}"] if self.tls_ca else [f"port {self.port}"]
        lines = [*ports, "bind 127.0.0.1", 'save ""', "appendonly no"]
        if self.password and self.username is None:
            lines.append(f"requirepass {self.password}")
        self.proc = subprocess.Popen(
            [binary, "-"],
            cwd=self.workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(("\n".join(lines) + "\n" + self.config).encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not shutil.which("redis-server"):
        pytest.skip("needs a redis-server binary to stop and restart")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


# ---- sandboxes without the service ------------------------------------------------

CONFINEMENT_KINDS = ["none"] + (["bubblewrap"] if shutil.which("bwrap") else [])
# Uids for sandboxes made by tests, far from any a stack hands out.
_test_uids = itertools.count(390_000 + os.getpid() % 1000 * 100)


@pytest.fixture(scope="session")
def confinements(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Confinement]]:
    """Each kind of confinement this machine offers, detected as a worker would."""
    settings = Settings(sandbox_root=str(tmp_path_factory.mktemp("boxes")))
    found = {"none": Confinement(kind="none", settings=settings)}
    if "bubblewrap" in CONFINEMENT_KINDS:
        found["bubblewrap"] = Confinement.detect(settings, "tests", networks=False)
    yield found
    for confinement in found.values():
        if confinement.cgroups is not None:
            confinement.cgroups.close()


@pytest.fixture(params=CONFINEMENT_KINDS)
def box(
    request: pytest.FixtureRequest, tmp_path: Path, confinements: dict[str, Confinement]
) -> Box:
    """A fresh sandbox under each kind of confinement (its own uid under bubblewrap)."""
    confinement = confinements[request.param]
    sandbox_id = str(uuid.uuid4())
    uid = next(_test_uids) if confinement.privileged else None
    workspace = prepare_workspace(str(tmp_path / "root"), sandbox_id, uid, None)
    spec = SandboxSpec(sandbox_id=sandbox_id, workspace=workspace, uid=uid, network=False)
    return Box(confinement, spec)
