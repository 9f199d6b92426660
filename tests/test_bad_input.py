"""Every kind of bad input gets a 4xx problem details and leaves stored history unchanged."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
import pytest
from helpers import text_message

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16).decode()

BAD_MESSAGES: dict[str, tuple[bytes | dict[str, Any], int, str]] = {
    "malformed_json": (b'{"role": "user", "content": [', 400, "malformed_json"),
    "not_an_object": (b"[1, 2]", 422, "invalid_body"),
    "empty_body": (b"", 400, "empty_body"),
    "empty_content": ({"role": "user", "content": []}, 422, "invalid_body"),
    "unknown_block_type": (
        {"role": "user", "content": [{"type": "video", "url": "x"}]},
        422,
        "invalid_body",
    ),
    "assistant_role": (
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
        422,
        "invalid_body",
    ),
    "missing_role": ({"content": [{"type": "text", "text": "hi"}]}, 422, "invalid_body"),
    "text_not_a_string": (
        {"role": "user", "content": [{"type": "text", "text": 5}]},
        422,
        "invalid_body",
    ),
    "content_not_a_list": ({"role": "user", "content": "hello"}, 422, "invalid_body"),
    "unknown_field": (
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "extra": 1},
        422,
        "invalid_body",
    ),
    "unknown_block_field": (
        {"role": "user", "content": [{"type": "text", "text": "hi", "bold": True}]},
        422,
        "invalid_body",
    ),
    "empty_text": (
        {"role": "user", "content": [{"type": "text", "text": ""}]},
        422,
        "invalid_body",
    ),
    "bad_base64": (
        {"role": "user", "content": [{"type": "image", "media_type": "image/png", "data": "@@@"}]},
        422,
        "invalid_body",
    ),
    "bad_media_type": (
        {"role": "user", "content": [{"type": "image", "media_type": "image/tiff", "data": PNG}]},
        422,
        "invalid_body",
    ),
    "tool_result_from_user": (
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "x", "content": "y"}],
        },
        422,
        "invalid_body",
    ),
}


def _post(client: httpx.Client, url: str, body: bytes | dict[str, Any]) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(url, content=body, headers={"content-type": "application/json"})
    return client.post(url, json=body)


def _assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status and problem["code"] == code
    assert problem["type"].endswith("/" + code) and problem["detail"]
    return problem


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_message_is_rejected_and_history_unchanged(
    client: httpx.Client, session_id: str, case: str
) -> None:
    ok = client.post(f"/sessions/{session_id}/messages", json=text_message("first"))
    assert ok.status_code == 200
    before = client.get(f"/sessions/{session_id}").json()

    body, status, code = BAD_MESSAGES[case]
    _assert_problem(_post(client, f"/sessions/{session_id}/messages", body), status, code)

    after = client.get(f"/sessions/{session_id}").json()
    assert after == before


def test_invalid_field_is_named(client: httpx.Client, session_id: str) -> None:
    response = client.post(
        f"/sessions/{session_id}/messages",
        json={"role": "user", "content": [{"type": "text", "text": 5}]},
    )
    assert _assert_problem(response, 422, "invalid_body")["field"] == "$.content[0].text"


def test_valid_image_is_accepted(client: httpx.Client, session_id: str) -> None:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image", "media_type": "image/png", "data": PNG},
        ],
    }
    assert client.post(f"/sessions/{session_id}/messages", json=message).status_code == 200
    stored = client.get(f"/sessions/{session_id}").json()["messages"][0]["content"]
    assert stored == message["content"]


def test_oversized_body_is_413_and_history_unchanged(client: httpx.Client, session_id: str) -> None:
    before = client.get(f"/sessions/{session_id}").json()
    huge = text_message("x" * (300 * 1024))  # the test stack's limit is 256 KiB
    response = client.post(f"/sessions/{session_id}/messages", json=huge)
    _assert_problem(response, 413, "body_too_large")
    assert client.get(f"/sessions/{session_id}").json() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sessions/{unknown}"),
        ("DELETE", "/sessions/{unknown}"),
        ("POST", "/sessions/{unknown}/messages"),
        ("POST", "/sessions/{unknown}/interrupt"),
        ("GET", "/sessions/{unknown}/stream"),
        ("GET", "/sandboxes/{unknown}"),
        ("DELETE", "/sandboxes/{unknown}"),
        ("GET", "/sandboxes/{unknown}/sessions"),
        ("POST", "/sandboxes/{unknown}/sessions"),
        ("GET", "/sessions/not-a-uuid"),
        ("POST", "/sandboxes/not-a-uuid/sessions"),
    ],
)
def test_unknown_ids_are_404_problems(client: httpx.Client, method: str, path: str) -> None:
    url = path.format(unknown=uuid.uuid4())
    body = text_message("hi") if method == "POST" else None
    response = client.request(method, url, json=body)
    assert response.status_code == 404
    assert response.json()["code"] in {"session_not_found", "sandbox_not_found"}


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": "0"}, "invalid_parameter"),
        ({"limit": "abc"}, "invalid_parameter"),
        ({"limit": "100000"}, "invalid_parameter"),
        ({"cursor": "nope"}, "invalid_cursor"),
    ],
)
def test_bad_paging_parameters_are_400(
    client: httpx.Client, sandbox_id: str, params: dict[str, str], code: str
) -> None:
    response = client.get(f"/sandboxes/{sandbox_id}/sessions", params=params)
    _assert_problem(response, 400, code)


@pytest.mark.parametrize("wait", ["-1", "abc", "100000"])
def test_bad_wait_parameter_is_400_and_nothing_is_stored(
    client: httpx.Client, session_id: str, wait: str
) -> None:
    response = client.post(
        f"/sessions/{session_id}/messages", params={"wait": wait}, json=text_message("hi")
    )
    _assert_problem(response, 400, "invalid_parameter")
    assert client.get(f"/sessions/{session_id}").json()["messages"] == []


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "\u00b2", "\u0663", "9" * 30, " 1"])
def test_bad_stream_cursor_is_400(client: httpx.Client, session_id: str, after: str) -> None:
    response = client.get(f"/sessions/{session_id}/stream", params={"after": after})
    _assert_problem(response, 400, "invalid_parameter")


def test_huge_last_event_id_is_400(client: httpx.Client, session_id: str) -> None:
    response = client.get(
        f"/sessions/{session_id}/stream",
        headers={"Last-Event-ID": "99999999999999999999999999999"},
    )
    _assert_problem(response, 400, "invalid_parameter")


@pytest.mark.parametrize("kind", ["object", "array"])
def test_deeply_nested_body_is_422_not_500(
    client: httpx.Client, sandbox_id: str, kind: str
) -> None:
    opener, closer = (b'{"a":', b"}") if kind == "object" else (b"[", b"]")
    body = b'{"metadata":{"a":' + opener * 5000 + b"1" + closer * 5000 + b"}}"
    for url in ("/sandboxes", f"/sandboxes/{sandbox_id}/sessions"):
        response = client.post(url, content=body)
        _assert_problem(response, 422, "invalid_body")
        assert "nest" in response.json()["detail"]
    assert client.get(f"/sandboxes/{sandbox_id}/sessions").json() == []


def test_bad_session_metadata_is_rejected(client: httpx.Client, sandbox_id: str) -> None:
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(6):
        deep = {"d": deep}
    for body in (
        {"metadata": "x"},
        {"metadata": {}, "other": 1},
        {"metadata": {"k": "v" * 20000}},
        {"metadata": deep},
    ):
        response = client.post(f"/sandboxes/{sandbox_id}/sessions", json=body)
        _assert_problem(response, 422, "invalid_body")
    assert client.get(f"/sandboxes/{sandbox_id}/sessions").json() == []


def test_unknown_route_and_method_are_problems(client: httpx.Client, session_id: str) -> None:
    _assert_problem(client.get("/nothing-here"), 404, "not_found")
    _assert_problem(client.put(f"/sessions/{session_id}"), 405, "method_not_allowed")


def test_too_many_blocks_and_oversized_images_are_refused() -> None:
    import msgspec

    from shared.models import MAX_IMAGE_BASE64, SendMessage

    many = {"role": "user", "content": [{"type": "text", "text": "x"}] * 101}
    with pytest.raises(msgspec.ValidationError, match="length <= 100"):
        msgspec.json.decode(msgspec.json.encode(many), type=SendMessage)
    huge = "A" * (MAX_IMAGE_BASE64 + 4)
    image = {
        "role": "user",
        "content": [{"type": "image", "media_type": "image/png", "data": huge}],
    }
    with pytest.raises(msgspec.ValidationError, match="length <="):
        msgspec.json.decode(msgspec.json.encode(image), type=SendMessage)
