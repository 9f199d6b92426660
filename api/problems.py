"""RFC 9457 problem details, with a stable `code` for every error a client can cause."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from redis.exceptions import RedisError

from shared.turns import store_unavailable

logger = logging.getLogger("sandstream.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://sandstream.dev/problems/"

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_body",
    429: "rate_limited",
    503: "unavailable",
}


class Problem(Exception):
    """Raise to answer with problem details."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int, code: str, detail: str, instance: str | None = None, **extra: Any
) -> Response[bytes]:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "code": code,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    return Response(
        content=msgspec.json.encode(body), status_code=status, media_type=PROBLEM_MEDIA_TYPE
    )


def not_found(what: str, ident: str) -> Problem:
    return Problem(404, f"{what}_not_found", f"no {what} with id {ident!r}")


def invalid_body(exc: msgspec.ValidationError | msgspec.DecodeError) -> Problem:
    """A body that does not match its schema: 422 naming the field (msgspec's path)."""
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        field = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
        # A mapping's key: "`key` in `$.path`" names the mapping.
        field = field.removeprefix("key` in `")
        return Problem(422, "invalid_body", text, field=field)
    return Problem(400, "malformed_json", f"the body is not valid JSON: {exc}")


def handle_problem(request: Request[Any, Any, Any], exc: Problem) -> Response[bytes]:
    response = problem_response(exc.status, exc.code, exc.detail, request.url.path, **exc.extra)
    response.headers.update(exc.headers)
    return response


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= HTTP_500_INTERNAL_SERVER_ERROR:
        return handle_internal(request, exc)
    code = _STATUS_CODES.get(status, "bad_request")
    detail = exc.detail
    if isinstance(exc, NotFoundException) and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    if isinstance(exc, ValidationException):
        code = "invalid_parameter"
        extra = exc.extra if isinstance(exc.extra, list) else []
        return problem_response(status, code, detail, request.url.path, errors=extra)
    headers = dict(exc.headers or {})
    response = problem_response(status, code, detail, request.url.path)
    response.headers.update(headers)
    return response


# How soon a client should retry when the store cannot serve it, in seconds.
STORE_RETRY_AFTER_SECONDS = 2


def handle_redis_down(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if not store_unavailable(exc):
        return handle_internal(request, exc)
    logger.error("store unavailable during %s %s: %s", request.method, request.url.path, exc)
    response = problem_response(
        503, "store_unavailable", "the store cannot serve this now; retry shortly"
    )
    response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
    return response


def handle_internal(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal_error", "an internal error occurred")


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    RedisError: handle_redis_down,
    ConnectionRefusedError: handle_redis_down,
    Exception: handle_internal,
}
