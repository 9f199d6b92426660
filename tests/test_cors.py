"""CORS: pages on the configured origins may call the API; preflights are never
refused for want of a key or a budget; other origins get no CORS headers."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ALPHA_KEY, Stack

from shared.settings import Settings

APP = "https://app.example.com"
STRANGER = "https://evil.example.net"
PREFLIGHT_HEADERS = "authorization, content-type, idempotency-key, last-event-id, x-request-id"


@pytest.fixture(scope="module")
def cors(redis_url: str) -> Iterator[Stack]:
    """An API whose key budget is tiny, so that a preflight counted against it would show."""
    url = redis_url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="sandstream-cors-"))
    env = {"SANDSTREAM_CORS_ORIGINS": f"{APP},http://localhost:5173"}
    running = Stack(url, workdir, env | {"SANDSTREAM_RATE_LIMIT_PER_MINUTE": "2"})
    yield running
    running.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _preflight(base: str, path: str, origin: str, method: str = "POST") -> httpx.Response:
    return httpx.options(
        base + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": PREFLIGHT_HEADERS,
        },
    )


@pytest.mark.parametrize(
    "path",
    ["/api/v1/sandboxes", "/api/v1/sessions/x/messages", "/api/v1/sessions/x/stream", "/metrics"],
)
def test_a_preflight_is_answered_before_authentication(cors: Stack, path: str) -> None:
    response = _preflight(cors.base_url, path, APP)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == APP
    allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert "x-request-id" in allowed
    assert "POST" in response.headers["access-control-allow-methods"]


def test_preflights_are_never_rate_limited(cors: Stack) -> None:
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", "Origin": APP}
    for _ in range(3):  # a try that straddles a minute boundary sees two windows
        minute = int(time.time() // 60)
        statuses = [
            httpx.get(cors.base_url + "/api/v1/sandboxes", headers=headers) for _ in range(4)
        ]
        if int(time.time() // 60) == minute:
            break
        time.sleep(1)
    assert statuses[-1].status_code == 429  # the key's budget is spent
    # The page can read why and when to retry.
    assert statuses[-1].headers["access-control-allow-origin"] == APP
    assert "retry-after" in statuses[-1].headers["access-control-expose-headers"]
    for _ in range(10):
        assert _preflight(cors.base_url, "/api/v1/sandboxes", APP).status_code == 204


def test_an_allowed_origin_may_read_the_response_and_its_paging_headers(cors: Stack) -> None:
    response = httpx.get(
        cors.base_url + "/api/v1/sessions/nope", headers={"Origin": "http://localhost:5173"}
    )
    assert response.status_code == 401  # no key: still a response the page can read
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert exposed == {"x-next-cursor", "link", "retry-after"}
    assert "access-control-allow-credentials" not in response.headers


def test_another_origin_gets_no_cors_headers(cors: Stack) -> None:
    preflight = _preflight(cors.base_url, "/api/v1/sandboxes", STRANGER)
    assert preflight.status_code not in (401, 429)
    assert "access-control-allow-origin" not in preflight.headers
    response = httpx.get(
        cors.base_url + "/healthz", headers={"Origin": STRANGER, "Authorization": "Bearer x"}
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-expose-headers" not in response.headers


def test_without_cors_origins_a_preflight_is_still_not_a_401(stack: Stack) -> None:
    response = _preflight(stack.base_url, "/api/v1/sandboxes", APP)
    assert response.status_code == 204
    assert "access-control-allow-origin" not in response.headers


def test_star_allows_any_origin_for_development(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(cors_origins="*")
    response = _preflight(stack.base_url, "/api/v1/sandboxes", STRANGER)
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "value", ["app.example.com", "https://*.example.com", "https://app.example.com/path"]
)
def test_cors_origins_must_be_exact_origins(value: str) -> None:
    with pytest.raises(SystemExit, match="cors_origins"):
        Settings.from_env({"SANDSTREAM_CORS_ORIGINS": value})
