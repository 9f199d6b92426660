"""What the Anthropic and OpenAI SDK providers share: one streaming call, guarded,
and the server-sent events of its response.

Both SDKs come from the same generator and share an exception family, so one
mapping turns their exceptions into ProviderError with a stable code and no
secrets; each provider passes its SDK module.

The SDKs make the request (auth, retries with backoff, status errors), but the
stream itself is read raw and each event decoded into a small msgspec struct:
the SDKs build a pydantic model per chunk, through typing introspection, which
cost most of a worker's CPU with many turns streaming at once. What arrived in
one network read is handed over as one batch, so a provider can join the text
deltas a lagging reader finds waiting into one, without ever holding one back.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from types import ModuleType
from typing import Any

from worker.providers.base import ProviderError, StreamItem
from worker.providers.transport import body_of

_CONTEXT_HINTS = ("prompt is too long", "context length", "context_length", "too many tokens")
_SECRET_LIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+\S+)")


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRET_LIKE.sub("[redacted]", text)


def _server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return str(getattr(exc, "message", "") or exc)


def classify(sdk: ModuleType, provider: str, exc: Exception, secrets: list[str]) -> ProviderError:
    """Map an SDK exception (after the SDK's own retries) to a ProviderError."""
    detail = scrub(_server_message(exc), secrets)[:500]
    status = getattr(exc, "status_code", None)
    where = f"{provider} answered HTTP {status}" if status else provider
    if isinstance(exc, sdk.AuthenticationError | sdk.PermissionDeniedError):
        return ProviderError("provider_auth", f"{where}: the API key was refused ({detail})")
    if isinstance(exc, sdk.RateLimitError):
        return ProviderError("provider_rate_limited", f"{where}: rate limited ({detail})")
    if isinstance(exc, sdk.BadRequestError | sdk.UnprocessableEntityError):
        if any(hint in detail.lower() for hint in _CONTEXT_HINTS):
            return ProviderError("context_too_long", f"{where}: {detail}")
        return ProviderError("provider_bad_request", f"{where}: {detail}")
    if isinstance(exc, sdk.NotFoundError):
        return ProviderError("provider_not_found", f"{where}: {detail}")
    if isinstance(exc, sdk.APITimeoutError):
        return ProviderError("provider_timeout", f"{provider} did not answer in time")
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderError("provider_unavailable", f"could not reach {provider}: {detail}")
    return ProviderError("provider_error", f"{where}: {detail}")


def _httpx_errors(name: str) -> tuple[type[Exception], ...]:
    """One exception class of httpx and of httpx2, whichever are installed: the
    SDKs let connection failures mid-stream through unwrapped, and older SDK
    releases sit on httpx, newer ones on its fork httpx2."""
    found: list[type[Exception]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS = _httpx_errors("TransportError")
# Reads that waited past the idle timeout (a subset of the transport errors).
TIMEOUT_ERRORS = _httpx_errors("TimeoutException")


def stream_cut(provider: str) -> ProviderError:
    return ProviderError(
        "provider_stream_cut", f"the {provider} stream ended before the response was complete"
    )


async def guarded_stream(
    sdk: ModuleType,
    provider: str,
    secrets: list[str],
    open_response: Callable[[], AbstractAsyncContextManager[Any]],
    read: Callable[[Any], AsyncIterator[StreamItem]],
) -> AsyncIterator[StreamItem]:
    """Make the SDK's streaming request, read its response, and close it however
    the reading ends.

    Closing on the way out is what makes an interrupt (a cancellation) close the
    HTTP response at once instead of reading the model's answer to its end.
    """
    try:
        async with open_response() as response:
            async for item in read(response):
                yield item
    except sdk.APIError as exc:
        raise classify(sdk, provider, exc, secrets) from None
    except TIMEOUT_ERRORS:
        # A read that waited past the idle timeout: the stream stalled.
        raise ProviderError(
            "provider_timeout", f"{provider} sent nothing within the idle timeout"
        ) from None
    except TRANSPORT_ERRORS:
        raise stream_cut(provider) from None


def event_batches(response: Any) -> AsyncIterator[list[bytes]]:
    """`sse_batches` of an SDK's raw streaming response: read off the lean
    transport's connection when it can be (`transport.body_of`), else through
    the SDK's byte iterator."""
    body = body_of(response.http_response)
    return sse_batches(response.iter_bytes() if body is None else body.pieces())


async def sse_batches(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The `data` of each server-sent event, a list per network read (events with
    no data, and comments, are left out)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        if b"\r" in pending:
            pending = pending.replace(b"\r\n", b"\n")
        if b"\n\n" not in pending:
            continue
        *complete, pending = pending.split(b"\n\n")
        batch = []
        for event in complete:
            data = [
                line[5:].removeprefix(b" ") for line in event.split(b"\n") if line[:5] == b"data:"
            ]
            if data:
                batch.append(b"\n".join(data))
        if batch:
            yield batch
