"""Redis with authentication and TLS: the service takes `redis://user:pass@`,
a password of its own setting, and `rediss://` with a CA file; the password
never shows in a log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from conftest import RedisServer, Stack
from helpers import new_session, text_message

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="needs redis-server")

# Characters that must be percent-encoded in a URL.
PASSWORD = "p@ss:w/rd%?#-0123456789"


def _a_turn_runs(stack: Stack) -> None:
    with stack.client() as client:
        sid = new_session(client)
        reply = client.post(f"/sessions/{sid}/messages", json=text_message("run: echo ok"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["content"][1]["content"] == "ok\n"


def _logs(stack: Stack) -> str:
    return "".join(p.log.read_text(errors="replace") for p in stack.procs)


def test_an_acl_user_and_password_in_the_url(tmp_path: Path) -> None:
    server = RedisServer(
        tmp_path,
        username="sandstream",
        password=PASSWORD,
        config=f"user default off\nuser sandstream on >{PASSWORD} ~* &* +@all\n",
    )
    stack = None
    try:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).ping()
        url = f"redis://sandstream:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
        stack = Stack(url, tmp_path / "stack", {"SANDSTREAM_LOG_LEVEL": "INFO"})
        _a_turn_runs(stack)
    finally:
        if stack is not None:
            stack.stop()
        server.stop()
    logs = _logs(stack)
    assert PASSWORD not in logs and quote(PASSWORD, safe="") not in logs
    assert "WITHOUT a password" not in logs


def test_a_password_of_its_own_setting(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password=PASSWORD)
    stack = Stack(
        server.url,
        tmp_path / "stack",
        {"SANDSTREAM_REDIS_PASSWORD": PASSWORD, "SANDSTREAM_LOG_LEVEL": "INFO"},
    )
    try:
        _a_turn_runs(stack)
    finally:
        stack.stop()
        server.stop()
    assert PASSWORD not in _logs(stack)


def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server = RedisServer(
        tmp_path,
        password=PASSWORD,
        config=(
            f"tls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\n"
            "tls-auth-clients no\n"
        ),
        tls_ca=cert,
    )
    url = f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
    stack = Stack(url, tmp_path / "stack", {"SANDSTREAM_REDIS_TLS_CA_FILE": str(cert)})
    try:
        _a_turn_runs(stack)
    finally:
        stack.stop()
        server.stop()


def test_redis_without_a_password_is_announced(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    stack = Stack(server.url, tmp_path / "stack", {"SANDSTREAM_LOG_LEVEL": "INFO"})
    try:
        _a_turn_runs(stack)
    finally:
        stack.stop()
        server.stop()
    assert _logs(stack).count("is used WITHOUT a password") == 2  # the API and the worker
