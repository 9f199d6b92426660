"""Request heads are bounded in the API process itself: 431, and no memory growth."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
from conftest import ALPHA_KEY, Stack


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _raw(stack: Stack, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as conn:
        conn.sendall(payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_a_header_over_the_limit_is_431(stack: Stack) -> None:
    big = b"x" * (70 * 1024)
    answer = _raw(stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"code":"headers_too_large"' in answer


def test_a_request_line_over_the_limit_is_431(stack: Stack) -> None:
    answer = _raw(stack, b"GET /healthz?" + b"a" * (70 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_too_many_header_fields_are_431(stack: Stack) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
    answer = _raw(stack, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_heads_within_the_limit_and_large_bodies_pass(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", "X-Pad": "p" * (60 * 1024)}
    for _ in range(2):  # twice on one connection: the count starts again per request
        with httpx.Client(base_url=stack.base_url) as http:
            assert http.get("/api/v1/sandboxes", headers=headers).status_code == 200
            body = b'{"metadata": {"k": "' + b"v" * (200 * 1024) + b'"}}'
            response = http.post("/api/v1/sandboxes", content=body, headers=headers)
            assert response.status_code == 422  # too much metadata, but read to its end


def test_huge_headers_do_not_grow_the_api_and_others_are_served(stack: Stack) -> None:
    pid = stack.api.popen.pid
    idle = _rss_mb(pid)
    stop = threading.Event()
    sent: list[int] = []

    def flood() -> None:
        total = 0
        try:
            with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"y" * 65536
                while total < 64 << 20 and not stop.is_set():
                    conn.sendall(chunk)
                    total += len(chunk)
        except OSError:
            pass  # the server answered 431 and closed the connection
        sent.append(total)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for thread in threads:
        thread.start()
    worst = 0.0
    peak = idle
    deadline = time.monotonic() + 20
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        started = time.monotonic()
        assert httpx.get(stack.base_url + "/healthz", timeout=5).status_code == 200
        worst = max(worst, time.monotonic() - started)
        peak = max(peak, _rss_mb(pid))
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert len(sent) == 8 and max(sent) < 64 << 20  # every one was cut short
    assert peak - idle < 50, f"RSS {idle:.0f} MB idle, {peak:.0f} MB at peak"
    assert worst < 1.0
