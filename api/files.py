"""A sandbox's files: upload, download (ranges, ETags), list, delete, and archives.

Paths are relative to the workspace, percent-decoded once (by the server);
NUL and `..` are refused. Bodies stream through in both directions, frame by
frame, to and from the sandbox's file service (`api.file_access`): no file is
ever held whole in this process.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import quote

import msgspec
from litestar import Controller, HttpMethod, Request, Response, delete, get, put, route
from litestar.exceptions import ClientException, InternalServerException
from litestar.params import Parameter
from litestar.response import Stream

from api import conditional
from api.file_access import KnownHash, SandboxFiles, file_problem
from api.guard import tenant_of
from api.pagination import paged_response
from api.problems import Problem, problem_response
from api.services import page_limit, services_of
from shared.models import ArchiveExtracted, FileEntry, FileWritten, rfc3339_of_ns
from shared.sandbox import transfers
from shared.sandbox.confinement import SandboxSpec
from shared.sandbox.files import Channel, FileRefused, FileServiceBroken
from shared.sandbox.handle import SandboxRefused

MAX_PATH_BYTES = 4096
# What one listing request may examine before it answers with what it found.
LIST_EXAMINED = 100_000
LIST_SECONDS = 5.0
ARCHIVE_SECONDS = 600.0
ARCHIVE_TYPES = {"tar": "application/x-tar", "tar.gz": "application/gzip", "zip": "application/zip"}
# Served files are the sandbox's, not ours: browsers are told not to sniff or run them.
_SERVED = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
_FAILED = (FileRefused, FileServiceBroken, SandboxRefused)


def workspace_relative(raw: str, field: str = "path") -> str:
    """A path from the URL as the file service takes it ('.' for the root)."""
    if "\x00" in raw:
        raise Problem(400, "invalid_path", "the path contains a NUL byte", field=field)
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Problem(400, "invalid_path", "the path may not contain '..'", field=field)
    rel = "/".join(parts) or "."
    if len(rel.encode(errors="surrogateescape")) > MAX_PATH_BYTES:
        raise Problem(400, "invalid_path", f"the path is over {MAX_PATH_BYTES} bytes", field=field)
    return rel


def _cursor_path(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        return base64.urlsafe_b64decode(cursor.encode() + b"==").decode()
    except (binascii.Error, UnicodeError, ValueError):
        raise Problem(400, "invalid_cursor", "unknown cursor", field="cursor") from None


def _cursor_of(path: str | None) -> str | None:
    return None if path is None else base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")


def _media_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


async def _request_body(request: Request[Any, Any, Any], limit: int) -> AsyncIterator[bytes]:
    """The body as it arrives, refused past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "body_too_large", f"the body is over the limit of {limit} bytes")
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise Problem(413, "body_too_large", f"the body is over the limit of {limit} bytes")
            yield chunk
    except InternalServerException:  # Litestar's word for a client gone mid-body
        raise Problem(400, "body_incomplete", "the client stopped sending the body") from None
    except ClientException as exc:
        raise Problem(400, "bad_request", str(exc.detail)) from None


async def _relay(chunks: AsyncIterator[bytes], stack: AsyncExitStack) -> AsyncIterator[bytes]:
    """Pass a stream from the file service on; when it ends, or the client goes,
    let go of the service (stopped if the conversation did not end)."""
    try:
        async for chunk in chunks:
            yield chunk
    except BaseException:
        await stack.__aexit__(*sys.exc_info())
        raise
    await stack.aclose()


async def _started(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`stream` with its first chunk taken now: a response that is never sent
    then still closes it (asyncio finalizes a started generator that is dropped)."""
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = b""

    async def resumed() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in stream:
            yield chunk

    return resumed()


class FilesController(Controller):
    path = "/api/v1/sandboxes/{sandbox_id:str}"

    @route("/files", http_method=[HttpMethod.GET, HttpMethod.HEAD])
    async def get_root(
        self,
        request: Request[Any, Any, Any],
        sandbox_id: str,
        recursive: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Response[Any]:
        return await _get(request, sandbox_id, ".", recursive, limit, cursor)

    @route("/files/{path:path}", http_method=[HttpMethod.GET, HttpMethod.HEAD])
    async def get_path(
        self,
        request: Request[Any, Any, Any],
        sandbox_id: str,
        path: str,
        recursive: bool = False,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Response[Any]:
        return await _get(request, sandbox_id, path, recursive, limit, cursor)

    @put("/files/{path:path}", request_max_body_size=None)
    async def put_file(
        self, request: Request[Any, Any, Any], sandbox_id: str, path: str
    ) -> Response[bytes]:
        svc = services_of(request)
        rel = workspace_relative(path)
        spec = await svc.files.owned(sandbox_id, tenant_of(request))
        limit = svc.settings.max_upload_bytes
        if_match = conditional.parse_tags(request.headers.get("if-match"))
        if_none_match = conditional.parse_tags(request.headers.get("if-none-match"))
        try:
            async with svc.files.open(spec) as sandbox, sandbox.files.channel() as channel:
                written = await transfers.upload(
                    channel,
                    rel,
                    _request_body(request, limit),
                    max_bytes=limit,
                    if_match=conditional.strong_values(if_match) if if_match else None,
                    if_none_match=conditional.any_values(if_none_match) if if_none_match else None,
                )
        except _FAILED as exc:
            raise file_problem(exc) from None
        answer = FileWritten(
            path=written.path,
            type="file",
            size=written.size,
            modified_at=rfc3339_of_ns(written.mtime_ns),
            sha256=written.sha256,
        )
        headers = {"ETag": conditional.etag_of(written.sha256)}
        if written.created:
            headers["Location"] = f"{_files_url(sandbox_id)}/{quote(written.path)}"
        return Response(
            msgspec.json.encode(answer),
            status_code=201 if written.created else 200,
            media_type="application/json",
            headers=headers,
        )

    @delete("/files/{path:path}", status_code=204)
    async def delete_file(
        self, request: Request[Any, Any, Any], sandbox_id: str, path: str, recursive: bool = False
    ) -> None:
        svc = services_of(request)
        rel = workspace_relative(path)
        spec = await svc.files.owned(sandbox_id, tenant_of(request))
        try:
            async with svc.files.open(spec) as sandbox, sandbox.files.channel() as channel:
                await transfers.remove(channel, rel, recursive)
        except _FAILED as exc:
            raise file_problem(exc) from None

    @put("/archive", request_max_body_size=None)
    async def put_archive(
        self, request: Request[Any, Any, Any], sandbox_id: str, path: str = "."
    ) -> ArchiveExtracted:
        svc = services_of(request)
        rel = workspace_relative(path)
        spec = await svc.files.owned(sandbox_id, tenant_of(request))
        settings = svc.settings
        limits = transfers.ArchiveLimits(
            entries=settings.archive_max_entries,
            bytes=settings.archive_max_bytes,
            archive_bytes=settings.max_upload_bytes,
            seconds=ARCHIVE_SECONDS,
        )
        body = _request_body(request, settings.max_upload_bytes)
        try:
            async with svc.files.open(spec) as sandbox, sandbox.files.channel() as channel:
                done = await transfers.extract(channel, rel, body, limits)
        except _FAILED as exc:
            raise file_problem(exc) from None
        return ArchiveExtracted(path=done.path, entries=done.entries, size=done.bytes)

    @get("/archive")
    async def get_archive(
        self,
        request: Request[Any, Any, Any],
        sandbox_id: str,
        path: str = ".",
        archive_format: str = Parameter(query="format", default="tar.gz"),
    ) -> Response[Any]:
        svc = services_of(request)
        rel = workspace_relative(path)
        if archive_format not in ARCHIVE_TYPES:
            raise Problem(
                400,
                "invalid_parameter",
                f"format must be one of {', '.join(ARCHIVE_TYPES)}",
                field="format",
            )
        spec = await svc.files.owned(sandbox_id, tenant_of(request))
        stack = AsyncExitStack()
        try:
            sandbox = await stack.enter_async_context(svc.files.open(spec))
            channel = await stack.enter_async_context(sandbox.files.channel())
            stream = await transfers.pack(
                channel,
                rel,
                archive_format,
                max_entries=svc.settings.archive_max_entries,
                max_seconds=LIST_SECONDS * 4,
            )
            body = await _started(_relay(stream, stack))
        except BaseException as exc:
            await stack.__aexit__(*sys.exc_info())
            if isinstance(exc, _FAILED):
                raise file_problem(exc) from None
            raise
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", rel.rsplit("/", 1)[-1]) if rel != "." else ""
        name = f"{stem or 'workspace'}.{archive_format}"
        return Stream(
            body,
            media_type=ARCHIVE_TYPES[archive_format],
            headers={"Content-Disposition": f'attachment; filename="{name}"', **_SERVED},
        )


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def _files_url(sandbox_id: str) -> str:
    return f"/api/v1/sandboxes/{sandbox_id}/files"


async def _get(
    request: Request[Any, Any, Any],
    sandbox_id: str,
    path: str,
    recursive: bool,
    limit: int | None,
    cursor: str | None,
) -> Response[Any]:
    svc = services_of(request)
    rel = workspace_relative(path)
    page_size = page_limit(limit, svc.settings)
    after = _cursor_path(cursor)
    spec = await svc.files.owned(sandbox_id, tenant_of(request))
    stack = AsyncExitStack()
    try:
        sandbox = await stack.enter_async_context(svc.files.open(spec))
        channel = await stack.enter_async_context(sandbox.files.channel())
        known = svc.files.known_hash(spec.sandbox_id, rel)
        head = await transfers.open_path(channel, rel, known.key if known else None)
        if isinstance(head, transfers.DirHead):
            page = await transfers.list_dir(
                channel,
                rel,
                recursive=recursive,
                limit=page_size,
                cursor=after,
                max_examined=LIST_EXAMINED,
                max_seconds=LIST_SECONDS,
            )
            await stack.aclose()
            entries = [
                FileEntry(
                    path=e.path, type=e.type, size=e.size, modified_at=rfc3339_of_ns(e.mtime_ns)
                )
                for e in page.entries
            ]
            return paged_response(request, entries, _cursor_of(page.next))
        return await _file_response(request, svc.files, spec, channel, head, known, stack)
    except BaseException as exc:
        await stack.__aexit__(*sys.exc_info())
        if isinstance(exc, _FAILED):
            raise file_problem(exc) from None
        raise


async def _file_response(
    request: Request[Any, Any, Any],
    files: SandboxFiles,
    spec: SandboxSpec,
    channel: Channel,
    head: transfers.FileHead,
    known: KnownHash | None,
    stack: AsyncExitStack,
) -> Response[Any]:
    """The file's answer: 200 or 206 with its bytes, or 304, 412 or 416 (RFC 9110 §13.2.2)."""
    sha256 = head.sha256 if head.sha256 is not None else known.sha256 if known else ""
    if head.sha256 is not None and head.stable:
        files.remember_hash(spec.sandbox_id, head.path, KnownHash(head.key, head.sha256))
    etag = conditional.etag_of(sha256)
    headers = {"ETag": etag, "Accept-Ranges": "bytes", **_SERVED}
    headers_in = request.headers
    status, span = 200, conditional.ByteRange(0, head.size - 1)
    problem: Response[bytes] | None = None
    if not conditional.if_match_holds(conditional.parse_tags(headers_in.get("if-match")), sha256):
        problem = problem_response(412, "precondition_failed", "If-Match names another version")
    elif not conditional.if_none_match_holds(
        conditional.parse_tags(headers_in.get("if-none-match")), sha256
    ):
        status = 304
    elif conditional.if_range_holds(headers_in.get("if-range"), sha256):
        try:
            asked = conditional.parse_range(headers_in.get("range"), head.size)
        except conditional.Unsatisfiable:
            problem = problem_response(
                416, "range_not_satisfiable", f"the file has {head.size} bytes"
            )
            problem.headers["Content-Range"] = f"bytes */{head.size}"
        else:
            if asked is not None:
                status, span = 206, asked
                headers["Content-Range"] = f"bytes {asked.start}-{asked.end}/{head.size}"
    sending = problem is None and status != 304 and request.method != "HEAD" and span.length > 0
    chunks = transfers.read_range(channel, span.start, span.length if sending else 0)
    if not sending:
        async for _ in chunks:
            pass
        await stack.aclose()
        if problem is not None:
            problem.headers.update({"ETag": etag})
            return problem
        if status == 304:
            return Response(b"", status_code=304, headers={"ETag": etag})
        # HEAD: the headers a GET would have, its Content-Length included.
        headers["Content-Length"] = str(max(0, span.length))
        return Stream(
            _nothing(), status_code=status, media_type=_media_type(head.path), headers=headers
        )
    headers["Content-Length"] = str(span.length)
    body = await _started(_relay(chunks, stack))
    return Stream(body, status_code=status, media_type=_media_type(head.path), headers=headers)
