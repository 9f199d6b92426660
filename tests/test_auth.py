"""Tenants and keys: every route refuses strangers and hides other tenants' resources."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import ADMIN_KEY, ALPHA_KEY, BETA_KEY, Stack
from helpers import StreamReader, text_message


@pytest.fixture
def beta(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(BETA_KEY) as http:
        yield http


@pytest.fixture
def owned(client: httpx.Client) -> dict[str, str]:
    """A sandbox and a session of tenant alpha, with one finished turn."""
    sandbox = client.post("/sandboxes", json={}).json()["id"]
    sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
    assert client.post(f"/sessions/{sid}/messages", json=text_message("hi")).status_code == 200
    return {"sandbox": sandbox, "sid": sid}


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/sandboxes/{sandbox}", None),
    ("DELETE", "/sandboxes/{sandbox}", None),
    ("GET", "/sandboxes/{sandbox}/sessions", None),
    ("POST", "/sandboxes/{sandbox}/sessions", {"metadata": {}}),
    ("GET", "/sessions/{sid}", None),
    ("DELETE", "/sessions/{sid}", None),
    ("POST", "/sessions/{sid}/messages", text_message("run: touch pwned")),
    ("POST", "/sessions/{sid}/interrupt", None),
    ("GET", "/sessions/{sid}/stream", None),
    ("POST", "/sessions/{sid}/stream-token", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_other_tenant_gets_404_on_every_route(
    client: httpx.Client,
    beta: httpx.Client,
    owned: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    before = client.get(f"/sessions/{owned['sid']}").json()
    response = beta.request(method, path.format(**owned), json=body)
    assert response.status_code == 404
    problem = response.json()
    # Exactly what a never-existing id gets.
    assert problem["code"] in {"sandbox_not_found", "session_not_found"}
    # And the owner's data is untouched.
    assert client.get(f"/sessions/{owned['sid']}").json() == before
    assert client.get(f"/sandboxes/{owned['sandbox']}").status_code == 200


def test_lists_show_only_your_own(
    client: httpx.Client, beta: httpx.Client, owned: dict[str, str]
) -> None:
    mine = beta.post("/sandboxes", json={"metadata": {"who": "beta"}}).json()["id"]
    beta_ids = [s["id"] for s in beta.get("/sandboxes", params={"limit": "200"}).json()]
    alpha_ids = [s["id"] for s in client.get("/sandboxes", params={"limit": "200"}).json()]
    assert mine in beta_ids and owned["sandbox"] not in beta_ids
    assert owned["sandbox"] in alpha_ids and mine not in alpha_ids


@pytest.mark.parametrize(("method", "path", "body"), [*ROUTES, ("GET", "/sandboxes", None)])
@pytest.mark.parametrize("auth", [None, "Bearer not-a-real-key-0000000000", "Basic abc", "Bearer"])
def test_missing_or_bad_key_is_401(
    stack: Stack,
    owned: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    auth: str | None,
) -> None:
    headers = {"Authorization": auth} if auth else {}
    response = httpx.request(
        method,
        stack.base_url + "/api/v1" + path.format(**owned),
        json=body,
        headers=headers,
        timeout=10,
    )
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/api/v1/ops/queues", "/api/v1/ops/workers", "/metrics"])
def test_ops_endpoints_need_an_admin_key(stack: Stack, client: httpx.Client, path: str) -> None:
    url = stack.base_url + path
    assert client.get(url).status_code == 403
    assert client.get(url).json()["code"] == "forbidden"
    with stack.client(ADMIN_KEY) as admin:
        assert admin.get(url).status_code == 200
    assert httpx.get(url).status_code == 401


def test_health_needs_no_key(stack: Stack) -> None:
    assert httpx.get(stack.base_url + "/healthz").status_code == 200
    assert httpx.get(stack.base_url + "/readyz").status_code == 200


def test_stream_token_opens_that_stream_only(
    stack: Stack, client: httpx.Client, owned: dict[str, str]
) -> None:
    minted = client.post(f"/sessions/{owned['sid']}/stream-token")
    assert minted.status_code == 201
    token = minted.json()["token"]
    assert minted.json()["expires_in"] > 0

    with httpx.Client(base_url=stack.base_url + "/api/v1", timeout=10) as browser:
        reader = StreamReader(browser, owned["sid"], params={"token": token, "after": "0"})
        events = reader.join()
        assert events[-1]["_event"] == "session_completed"
        # The token is for that one stream: nothing else accepts it.
        assert browser.get(f"/sessions/{owned['sid']}", params={"token": token}).status_code == 401
        other = client.post(f"/sandboxes/{owned['sandbox']}/sessions", json={}).json()["id"]
        assert browser.get(f"/sessions/{other}/stream", params={"token": token}).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        assert browser.get(f"/sessions/{owned['sid']}", headers=headers).status_code == 401
        assert (
            browser.get(
                f"/sessions/{owned['sid']}/stream", params={"token": "sst_forged"}
            ).status_code
            == 401
        )


def test_stream_token_url_stops_opening_its_stream_after_its_window(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(stream_token_seconds="1")
    with stack.client() as client:
        sandbox = client.post("/sandboxes", json={}).json()["id"]
        sid = client.post(f"/sandboxes/{sandbox}/sessions", json={}).json()["id"]
        token = client.post(f"/sessions/{sid}/stream-token").json()["token"]
        time.sleep(2.1)
        response = httpx.get(
            f"{stack.base_url}/api/v1/sessions/{sid}/stream", params={"token": token}
        )
        assert response.status_code == 401


def test_rate_limit_holds_across_two_api_processes(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(rate_limit_per_minute="20")
    apis = [stack.base_url, stack.start_api()]
    headers = {"Authorization": f"Bearer {ALPHA_KEY}"}
    for _ in range(3):  # a try that straddles a minute boundary sees two windows
        minute = int(time.time() // 60)
        responses = [
            httpx.get(apis[i % 2] + "/api/v1/sandboxes", headers=headers) for i in range(26)
        ]
        if int(time.time() // 60) == minute:
            break
        time.sleep(1)
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 20 + [429] * 6
    limited = responses[-1]
    assert limited.json()["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 61
    # Another key has its own budget.
    other = {"Authorization": f"Bearer {BETA_KEY}"}
    assert httpx.get(apis[1] + "/api/v1/sandboxes", headers=other).status_code == 200


def test_api_refuses_to_start_without_keys(make_stack: Callable[..., Stack]) -> None:
    with pytest.raises(RuntimeError, match="no API keys configured"):
        make_stack(api_keys="", admin_keys="")


def test_auth_off_warns_loudly(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(auth="false", log_level="WARNING")
    response = httpx.post(stack.base_url + "/api/v1/sandboxes", json={})
    assert response.status_code == 201
    log = stack.api.log.read_text()
    assert "AUTHENTICATION IS OFF" in log


def test_keys_never_reach_the_logs(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(log_level="DEBUG", access_log="true")
    with stack.client() as client:
        client.get("/sandboxes")
        sid_sandbox = client.post("/sandboxes", json={}).json()["id"]
        sid = client.post(f"/sandboxes/{sid_sandbox}/sessions", json={}).json()["id"]
        client.post(f"/sessions/{sid}/messages", json=text_message("hello"))
    httpx.get(
        stack.base_url + "/api/v1/sandboxes", headers={"Authorization": "Bearer wrong-key-123"}
    )
    logs = "".join(p.log.read_text() for p in stack.procs)
    assert ALPHA_KEY not in logs and ADMIN_KEY not in logs and "wrong-key-123" not in logs
