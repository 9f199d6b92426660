"""The files in `deploy/`, checked with what runs on this machine.

The proxy config runs for real in front of two API processes; the systemd
units go through `systemd-analyze verify`; the alert rules through `promtool`
(syntax and unit tests); supervisord runs its config and restarts a killed
worker; the Kubernetes manifests are checked against the Kubernetes API
schemas; the dashboard and alerts only name series that /metrics exports.
Docker itself (the image, docker-compose.yml as a whole) is not run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ADMIN_KEY, ALPHA_KEY, ROOT, RedisServer, Stack, _wait_for, nginx_proxy
from helpers import ResumingReader, free_port, new_session, text_message

DEPLOY = ROOT / "deploy"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} is missing: scripts/ensure-tools.sh installs it")
    return found


@pytest.fixture
def proxy(make_stack: Callable[..., Stack], tmp_path: Path) -> Iterator[tuple[Stack, str]]:
    """deploy/nginx/nginx.conf in front of two API processes (`nginx_proxy`)."""
    stack = make_stack()
    second = stack.start_api()
    ports = [stack.port, int(second.rsplit(":", 1)[1])]
    with nginx_proxy(ports, tmp_path) as (base, _log):
        yield stack, base


def test_proxy_streams_live_and_survives_a_replica_stopping(proxy: tuple[Stack, str]) -> None:
    stack, base = proxy
    auth = {"Authorization": f"Bearer {ALPHA_KEY}"}
    with httpx.Client(base_url=base + "/api/v1", headers=auth, timeout=30) as client:
        sid = new_session(client)
        reader = ResumingReader([base], ALPHA_KEY, sid, until=2)
        time.sleep(0.5)
        first = client.post(f"/sessions/{sid}/messages", json=text_message("run: sleep 1.5"))
        assert first.status_code == 200, first.text
        # One replica stops: its streams are told to reconnect, the proxy sends
        # them and new requests to the other.
        stack.api.stop(signal.SIGTERM)
        second = client.post(f"/sessions/{sid}/messages", json=text_message("again"))
        assert second.status_code == 200, second.text
        events = reader.join()
        assert httpx.get(base + "/metrics", headers=auth).status_code == 404
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["_event"] for e in events].count("session_completed") == 2
    # Unbuffered: the tool call reached the client before the command finished.
    started = next(e["_at"] for e in events if e["_event"] == "tool_use_start")
    ended = next(e["_at"] for e in events if e["_event"] == "session_completed")
    assert ended - started > 1.0


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` needs the ExecStart binaries to exist: the units
    are checked with this checkout's virtualenv in place of /opt/sandstream."""
    venv = ROOT / ".venv"
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} == {"sandstream-api.service", "sandstream-worker@.service"}
    for unit in units:
        text = unit.read_text().replace("/opt/sandstream/.venv", str(venv))
        name = unit.name.replace("@.", "@1.")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", *(str(p) for p in sorted(tmp_path.iterdir()))],
        capture_output=True,
        text=True,
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        # The machine running the tests has no such user or environment file.
        if "sandstream" in line and "/etc/sandstream" not in line
    ]
    assert result.returncode == 0 or not problems, result.stderr
    assert not problems, result.stderr
    worker = (DEPLOY / "systemd" / "sandstream-worker@.service").read_text()
    stop = int(re.search(r"TimeoutStopSec=(\d+)", worker).group(1))  # type: ignore[union-attr]
    drain = int(re.search(r"SANDSTREAM_WORKER_DRAIN_SECONDS=(\d+)", worker).group(1))  # type: ignore[union-attr]
    assert stop > drain


def test_alert_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    rules = DEPLOY / "prometheus" / "alerts.yml"
    checked = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = subprocess.run(
        [promtool, "check", "config", "--syntax-only", "prometheus.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr


def _referenced_series() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "sandstream.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for expr in exprs
        for name in re.findall(r"\bsandstream_[a-z_]+", expr)
    }


def test_dashboard_and_alerts_name_only_exported_series(stack: Stack) -> None:
    response = httpx.get(
        stack.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    exported = set(re.findall(r"^# TYPE (\w+) ", response.text, re.MULTILINE))
    missing = _referenced_series() - exported
    assert not missing, missing


def _worker_pids(base: str) -> set[int]:
    response = httpx.get(
        base + "/api/v1/ops/workers", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    return {w["pid"] for w in response.json()} if response.status_code == 200 else set()


def test_supervisord_config_runs_and_restarts_a_killed_worker(tmp_path: Path) -> None:
    """deploy/supervisor/supervisord.conf as shipped, with this checkout's
    virtualenv and scratch directories in place of /opt, /var and /run."""
    conf = (DEPLOY / "supervisor" / "supervisord.conf").read_text()
    for old, new in (
        ("/opt/sandstream/.venv", str(ROOT / ".venv")),
        ("/var/lib/sandstream", str(tmp_path)),
        ("/var/log/sandstream", str(tmp_path)),
        ("/run/sandstream", str(tmp_path)),
    ):
        assert old in conf
        conf = conf.replace(old, new)
    path = tmp_path / "supervisord.conf"
    path.write_text(conf)
    password = "s3cret-for-supervisord"
    protected = RedisServer(tmp_path, password=password)
    url = f"redis://127.0.0.1:{protected.port}/0"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SANDSTREAM_")},
        "SANDSTREAM_REDIS_URL": url,
        "SANDSTREAM_REDIS_PASSWORD": password,
        "SANDSTREAM_PORT": str(port),
        "SANDSTREAM_SANDBOX_ROOT": str(tmp_path / "sandboxes"),
        "SANDSTREAM_API_KEYS": f"alpha={ALPHA_KEY}",
        "SANDSTREAM_ADMIN_KEYS": f"ops={ADMIN_KEY}",
        "SANDSTREAM_WORKER_HEARTBEAT_SECONDS": "0.5",
    }
    bin_dir = ROOT / ".venv" / "bin"
    supervisord = subprocess.Popen(
        [str(bin_dir / "supervisord"), "-n", "-c", str(path)], env=env, cwd=tmp_path
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: len(_worker_pids(base)) == 2, 30, "API and two workers")
        victim = min(_worker_pids(base))
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(_worker_pids(base) - {victim}) == 2, 30, "a worker in its place")
        with httpx.Client(
            base_url=base + "/api/v1", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as client:
            sid = new_session(client)
            sent = client.post(f"/sessions/{sid}/messages", json=text_message("hello"))
            assert sent.status_code == 200

        def running() -> int:
            status = subprocess.run(
                [str(bin_dir / "supervisorctl"), "-c", str(path), "status"],
                capture_output=True,
                text=True,
                env=env,
            )
            return status.stdout.count("RUNNING")

        _wait_for(lambda: running() == 3, 10, "supervisord to call all three running")
    finally:
        supervisord.send_signal(signal.SIGTERM)
        supervisord.wait(60)
        protected.stop()
    assert supervisord.returncode == 0


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    directory = DEPLOY / "kubernetes"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    manifests = [directory / name for name in kustomization["resources"]]
    assert sorted(manifests) == sorted(
        p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kubernetes-validate"), "--strict", "--quiet"]
        + [str(p) for p in manifests],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    docs = [d for p in manifests for d in yaml.safe_load_all(p.read_text())]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Deployment", "api"),
        ("Deployment", "worker"),
        ("Service", "api"),
        ("PodDisruptionBudget", "api"),
        ("PodDisruptionBudget", "worker"),
    } <= kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    worker = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "worker"
    )
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(config["SANDSTREAM_WORKER_DRAIN_SECONDS"])
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "api")
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"


def _seconds(duration: str) -> int:
    assert duration.endswith("s")
    return int(duration[:-1])


def test_compose_file_wires_the_stack() -> None:
    """docker-compose.yml parses and holds what production needs; `docker compose
    config` and a real `up` need a Docker engine, which this machine lacks."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    redis_service = services["redis"]
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Redis requires the password, handed over on stdin and to redis-cli.
    assert "requirepass" in " ".join(redis_service["command"])
    assert set(redis_service["environment"]) == {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    conf = (DEPLOY / "redis.conf").read_text()
    assert "appendonly yes" in conf
    assert "client-output-buffer-limit pubsub 256mb 64mb 60" in conf
    api, worker, proxy = services["api"], services["worker"], services["proxy"]
    assert api["deploy"]["replicas"] == 2 and worker["deploy"]["replicas"] == 2
    for service in (api, worker):
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["SANDSTREAM_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["SANDSTREAM_REDIS_PASSWORD"].startswith(
            "${SANDSTREAM_REDIS_PASSWORD:?"
        )
        assert service["privileged"] is True
    drain = int(worker["environment"]["SANDSTREAM_WORKER_DRAIN_SECONDS"])
    assert _seconds(worker["stop_grace_period"]) > drain
    assert "readyz" in " ".join(api["healthcheck"]["test"])
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    for service in ("prometheus", "grafana"):
        assert services[service]["profiles"] == ["monitoring"]
    # Every file mounted from the repository exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_read_timeout 1h;", "proxy_http_version 1.1;"):
        assert directive in nginx


def test_proxy_closes_a_stream_it_cannot_serve_and_logs_no_token(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """With no replica up, a stream request gets its connection closed (444), on
    which EventSource retries, not a 502, on which it gives up for good; and the
    error log, which quotes request lines, does not quote the stream token."""
    stack = make_stack()
    with stack.client() as client:
        sid = new_session(client)
        token = client.post(f"/sessions/{sid}/stream-token").json()["token"]
    with nginx_proxy([stack.port], tmp_path) as (base, log):
        stack.api.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(
                f"{base}/api/v1/sessions/{sid}/stream",
                params={"token": token},
                headers={"Accept": "text/event-stream"},
                timeout=10,
            )
        # Other requests still get the proxy's 502, and are logged.
        assert httpx.get(base + "/api/v1/sandboxes", timeout=10).status_code == 502
    text = log.read_text()
    assert "/api/v1/sandboxes" in text
    assert token not in text and "token=" not in text
