"""Lists are plain JSON arrays; the next page's cursor travels in headers."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import msgspec
from litestar import Request, Response


def paged_response(
    request: Request[Any, Any, Any], items: list[Any], next_cursor: str | None
) -> Response[bytes]:
    headers: dict[str, str] = {}
    if next_cursor is not None:
        query = {k: v for k, v in request.query_params.items() if k != "cursor"}
        query["cursor"] = next_cursor
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = f'<{request.url.path}?{urlencode(query)}>; rel="next"'
    return Response(
        content=msgspec.json.encode(items), media_type="application/json", headers=headers
    )
