"""The OpenAPI document, written from the same msgspec types the API decodes and encodes.

The handlers decode bodies themselves (to give precise problem details), so a
framework-generated document would miss the request bodies and describe lists
and errors wrongly. This one is the contract: schemathesis checks the running
API against it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from api.schemas import (
    ApprovalResult,
    BrowserGrant,
    CreateGrant,
    Credential,
    Health,
    InterruptResult,
    ProblemDetails,
    StreamToken,
    TurnAccepted,
)
from shared.models import (
    ApprovalDecision,
    ArchiveExtracted,
    CreateSandbox,
    CreateSession,
    FileEntry,
    FileWritten,
    Message,
    Sandbox,
    SendMessage,
    Session,
    SessionWithMessages,
)
from shared.ops import QueueReport, WorkerReport

_REF = "#/components/schemas/{name}"
_TYPES: list[Any] = [
    FileEntry,
    FileWritten,
    ArchiveExtracted,
    CreateSandbox,
    CreateSession,
    SendMessage,
    Sandbox,
    Session,
    SessionWithMessages,
    Message,
    ProblemDetails,
    TurnAccepted,
    InterruptResult,
    ApprovalDecision,
    ApprovalResult,
    StreamToken,
    CreateGrant,
    BrowserGrant,
    Credential,
    Health,
    QueueReport,
    WorkerReport,
]

_UUID = {"type": "string", "format": "uuid"}
_ERRORS = {
    400: "invalid parameter or malformed body",
    401: "missing or unknown API key (or browser credential, or stream token)",
    403: "an admin key is needed, or a browser credential does not cover this (`outside_grant`)",
    404: "no such resource (or another tenant's)",
    409: "the path is in the way (a directory where a file is wanted, a directory not empty...)",
    412: "If-Match or If-None-Match does not hold",
    413: "body over the size limit",
    416: "the Range cannot be satisfied; Content-Range says the size",
    422: "body does not match the schema; `field` names where",
    429: "rate limited; see Retry-After",
    503: (
        "the store cannot serve now (`store_unavailable`: unreachable, timing out, out of "
        "memory, read-only, loading, busy; see Retry-After), or the sandbox's file service "
        "is unavailable"
    ),
    507: "the sandbox's disk quota is full",
}


_STREAM_NOTES = (
    "A browser's request (`Accept: text/event-stream`) is never answered 429 or 503, on "
    "which EventSource gives up for good: past the credential's stream-connection budget, "
    "or while the store is unreachable, the stream opens with a `retry:` hint and a "
    "`reconnect` event, and ends. A stream opened with a stream token ends with a "
    "`grant_expired` event when the token expires."
)


def _ref(kind: Any) -> dict[str, str]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _UUID}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "a retry with the same key and body gets the first request's outcome",
}

_ARCHIVE_TYPES = ("application/gzip", "application/x-tar", "application/zip")
_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_FILE_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
    "description": "relative to the workspace, may hold `/`; NUL and `..` are refused (400)",
}
_FILE_HEADERS = {
    name: {"schema": {"type": "string"}, "description": text}
    for name, text in (
        ("ETag", "the file's sha256, quoted (a strong validator)"),
        ("Content-Length", "bytes in this response"),
        ("Accept-Ranges", "`bytes`"),
    )
}


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


_PAGING = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "page size (50)"),
    _query("cursor", {"type": "string"}, "from the X-Next-Cursor header of the last page"),
]
_RECURSIVE = _query(
    "recursive", {"type": "boolean"}, "a directory's whole tree (list), or all it holds (delete)"
)
_DIRECTORY = _query("path", {"type": "string"}, "a directory relative to the workspace (its root)")


def _operation(
    op_id: str,
    summary: str,
    responses: dict[int, dict[str, Any]],
    *,
    params: list[dict[str, Any]] | None = None,
    body: Any = None,
    body_required: bool = True,
    raw_body: str | None = None,
    errors: tuple[int, ...] = (),
    public: bool = False,
    description: str = "",
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "parameters": params or [],
    }
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if raw_body is not None:
        operation["requestBody"] = {"required": False, "description": raw_body, "content": _BYTES}
    all_responses = {str(status): spec for status, spec in responses.items()}
    codes = set(errors) if public else {401, 429, 503, *errors}
    for status in sorted(codes):
        all_responses[str(status)] = {
            "description": _ERRORS.get(status, "problem"),
            "content": {"application/problem+json": {"schema": _ref(ProblemDetails)}},
        }
    operation["responses"] = all_responses
    if public:
        operation["security"] = []
    return operation


# Where a created resource's id leads (the stream is left out: it never ends).
_SANDBOX_OPS = ("getSandbox", "listSessions", "createSession", "deleteSandbox")
_SESSION_OPS = (
    "getSession",
    "sendMessage",
    "interruptSession",
    "decideToolCall",
    "createStreamToken",
    "createBrowserGrant",
    "deleteSession",
)


def _linked(response: dict[str, Any], param: str, operations: tuple[str, ...]) -> dict[str, Any]:
    response["links"] = {
        op: {"operationId": op, "parameters": {param: "$response.body#/id"}} for op in operations
    }
    return response


def build_openapi(version: str) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    sid, sandbox = [_path("sid")], [_path("sandbox_id")]
    body_errors = (400, 413, 422)
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/sandboxes": {
            "post": _operation(
                "createSandbox",
                "Create a sandbox",
                {201: _linked(_json(_ref(Sandbox), "the sandbox"), "sandbox_id", _SANDBOX_OPS)},
                params=[_IDEMPOTENCY],
                body=CreateSandbox,
                body_required=False,
                # 404: a retry whose Idempotency-Key made a sandbox deleted since.
                errors=(404, *body_errors),
            ),
            "get": _operation(
                "listSandboxes",
                "List your sandboxes",
                {200: _json({"type": "array", "items": _ref(Sandbox)}, "one page")},
                params=_PAGING,
                errors=(400,),
            ),
        },
        "/api/v1/sandboxes/{sandbox_id}": {
            "get": _operation(
                "getSandbox",
                "Get a sandbox",
                {200: _json(_ref(Sandbox), "the sandbox")},
                params=sandbox,
                errors=(404,),
            ),
            "delete": _operation(
                "deleteSandbox",
                "Delete a sandbox, its sessions and its workspace",
                {204: {"description": "deleted"}},
                params=sandbox,
                errors=(404,),
            ),
        },
        "/api/v1/sandboxes/{sandbox_id}/sessions": {
            "post": _operation(
                "createSession",
                "Create a session",
                {201: _linked(_json(_ref(Session), "the session"), "sid", _SESSION_OPS)},
                params=[*sandbox, _IDEMPOTENCY],
                body=CreateSession,
                body_required=False,
                errors=(404, *body_errors),
            ),
            "get": _operation(
                "listSessions",
                "List the sandbox's sessions",
                {200: _json({"type": "array", "items": _ref(Session)}, "one page")},
                params=sandbox + _PAGING,
                errors=(400, 404),
            ),
        },
        "/api/v1/sandboxes/{sandbox_id}/files": {
            method: _operation(
                f"{method}WorkspaceRoot",
                "List the workspace's root directory",
                {200: _json({"type": "array", "items": _ref(FileEntry)}, "one page")},
                params=[*sandbox, _RECURSIVE, *_PAGING],
                errors=(400, 404, 503),
            )
            for method in ("get", "head")
        },
        "/api/v1/sandboxes/{sandbox_id}/files/{path}": {
            **{
                method: _operation(
                    f"{method}File",
                    "A file's bytes (Range, ETag), or a directory's entries",
                    {
                        200: {
                            "description": "the file (Content-Type from its name), or for a "
                            "directory a JSON array of FileEntry",
                            "headers": _FILE_HEADERS,
                            "content": {"*/*": {"schema": {}}},
                        },
                        206: {
                            "description": "the byte range asked for; Content-Range says which",
                            "headers": _FILE_HEADERS,
                            "content": {"*/*": {"schema": {}}},
                        },
                        304: {"description": "If-None-Match holds: the client has this version"},
                    },
                    params=[
                        *sandbox,
                        _FILE_PATH,
                        _RECURSIVE,
                        *_PAGING,
                        _header("Range", "one byte range, `bytes=first-last`"),
                        _header("If-Range", "the ETag a Range applies to"),
                        _header("If-Match", "ETags; 412 unless the file has one of them"),
                        _header("If-None-Match", "ETags; 304 when the file has one of them"),
                    ],
                    errors=(400, 404, 409, 412, 416, 503),
                )
                for method in ("get", "head")
            },
            "put": _operation(
                "putFile",
                "Upload a file (the raw body), its parent directories made as needed",
                {
                    200: _json(_ref(FileWritten), "replaced"),
                    201: _json(_ref(FileWritten), "created"),
                },
                params=[
                    *sandbox,
                    _FILE_PATH,
                    _header("If-Match", "ETags; 412 unless the file has one of them"),
                    _header("If-None-Match", "`*`: 412 if the file exists"),
                ],
                raw_body="the file's bytes",
                errors=(400, 404, 409, 412, 413, 503, 507),
            ),
            "delete": _operation(
                "deleteFile",
                "Delete a file, a link, or a directory (empty, or with `recursive=true`)",
                {204: {"description": "deleted"}},
                params=[*sandbox, _FILE_PATH, _RECURSIVE],
                errors=(400, 404, 409, 503),
            ),
        },
        "/api/v1/sandboxes/{sandbox_id}/archive": {
            "put": _operation(
                "putArchive",
                "Extract a tar, tar.gz or zip archive (the raw body) into a directory, "
                "all of it or nothing",
                {200: _json(_ref(ArchiveExtracted), "extracted")},
                params=[*sandbox, _DIRECTORY],
                raw_body="the archive",
                errors=(400, 404, 409, 413, 422, 503, 507),
            ),
            "get": _operation(
                "getArchive",
                "A directory of the workspace as an archive, streamed",
                {
                    200: {
                        "description": "the archive",
                        "content": {
                            media: {"schema": {"type": "string", "format": "binary"}}
                            for media in (
                                "application/gzip",
                                "application/x-tar",
                                "application/zip",
                            )
                        },
                    }
                },
                params=[
                    *sandbox,
                    _DIRECTORY,
                    _query(
                        "format",
                        {"type": "string", "enum": ["tar.gz", "tar", "zip"]},
                        "the archive's format (tar.gz)",
                    ),
                ],
                errors=(400, 404, 409, 413, 503),
            ),
        },
        "/api/v1/sessions/{sid}": {
            "get": _operation(
                "getSession",
                "Get a session with its full message history",
                {200: _json(_ref(SessionWithMessages), "the session")},
                params=sid,
                errors=(404,),
            ),
            "delete": _operation(
                "deleteSession",
                "Delete a session",
                {204: {"description": "deleted"}},
                params=sid,
                errors=(404,),
            ),
        },
        "/api/v1/sessions/{sid}/messages": {
            "post": _operation(
                "sendMessage",
                "Send a user message and wait for the assistant's reply",
                {
                    200: _json(_ref(Message), "the assistant message of the turn"),
                    202: _json(
                        _ref(TurnAccepted),
                        "the wait limit passed, or the turn awaits approval of tool calls "
                        "(`state`: `awaiting_approval`, with `pending_approvals`)",
                    ),
                    409: {
                        "description": "a turn is running or awaits approval "
                        "(`turn_in_progress`, naming it)",
                        "content": {"application/problem+json": {"schema": _ref(ProblemDetails)}},
                    },
                    502: {
                        "description": "the turn failed (session_failed)",
                        "content": {"application/problem+json": {"schema": _ref(ProblemDetails)}},
                    },
                },
                params=[
                    *sid,
                    _query("wait", {"type": "number", "minimum": 0}, "seconds to wait at most"),
                    _IDEMPOTENCY,
                ],
                body=SendMessage,
                errors=(404, *body_errors),
            ),
        },
        "/api/v1/sessions/{sid}/approvals/{tool_use_id}": {
            "post": _operation(
                "decideToolCall",
                "Allow or deny a tool call that awaits approval",
                {
                    200: _json(_ref(ApprovalResult), "the decision as recorded"),
                    409: {
                        "description": "the call was decided otherwise before "
                        "(`approval_conflict`)",
                        "content": {"application/problem+json": {"schema": _ref(ProblemDetails)}},
                    },
                },
                params=[
                    *sid,
                    {
                        "name": "tool_use_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "minLength": 1},
                        "description": "the call's id, from `tool_approval_requested` or "
                        "the session's `pending_approvals`",
                    },
                ],
                body=ApprovalDecision,
                errors=(403, 404, *body_errors),
                description=(
                    "The same decision again answers 200 alike (a retry is safe); a call "
                    "whose turn went on or ended is 404 (`approval_not_found`). When no call "
                    "is left undecided the turn goes on, on any worker: allowed calls run, "
                    "denied ones give the model an error result with the reason. A browser "
                    "credential needs the `approve` scope."
                ),
            ),
        },
        "/api/v1/sessions/{sid}/interrupt": {
            "post": _operation(
                "interruptSession",
                "Stop the running turn",
                {200: _json(_ref(InterruptResult), "what happened")},
                params=sid,
                errors=(404,),
            ),
        },
        "/api/v1/sessions/{sid}/stream": {
            "get": _operation(
                "streamSession",
                "The session's events as Server-Sent Events",
                {
                    200: {
                        "description": (
                            "an endless event stream: the session's events (`id:` their seq), "
                            "and the stream's own, without `id:`: `keepalive{latest_seq}`, "
                            "`log_truncated{after,first_seq}` (events between were trimmed "
                            "from the log), `reconnect` (the stream ends; resume with "
                            "Last-Event-ID) and `session_deleted` (the stream ends)"
                        ),
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    }
                },
                params=[
                    *sid,
                    _query(
                        "after", {"type": "integer", "minimum": 0}, "replay events after this seq"
                    ),
                    _query(
                        "token",
                        {"type": "string"},
                        "a stream token, for EventSource: opens the stream by itself for "
                        "`opens_for` seconds, and resumes it with Last-Event-ID until it expires",
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "resume after this seq (EventSource sends it itself)",
                    },
                ],
                errors=(400, 403, 404),
                description=_STREAM_NOTES,
            ),
        },
        "/api/v1/sessions/{sid}/stream-token": {
            "post": _operation(
                "createStreamToken",
                "Mint a token that opens and resumes this session's stream, read-only",
                {201: _json(_ref(StreamToken), "the token, with an absolute stream_url")},
                params=sid,
                errors=(403, 404),
            ),
        },
        "/api/v1/sessions/{sid}/grants": {
            "post": _operation(
                "createBrowserGrant",
                "Mint a browser credential for one session (tenant keys only)",
                {201: _json(_ref(BrowserGrant), "the credential, for Authorization: Bearer")},
                params=sid,
                body=CreateGrant,
                body_required=False,
                errors=(403, 404, *body_errors),
                description=(
                    "For a tenant's backend: the page it hands this to may read, stream, send "
                    "to and interrupt this one session (as `scopes` say) and nothing else."
                ),
            ),
        },
        "/api/v1/whoami": {
            "get": _operation(
                "whoami",
                "What the presented key or browser credential is and may do",
                {200: _json(_ref(Credential), "the credential")},
            ),
        },
        "/api/v1/ops/queues": {
            "get": _operation(
                "opsQueues",
                "Queued, deferred and in-progress turns, oldest age, recent outcomes (admin)",
                {200: _json({"type": "array", "items": _ref(QueueReport)}, "one entry a queue")},
                errors=(403,),
            ),
        },
        "/api/v1/ops/workers": {
            "get": _operation(
                "opsWorkers",
                "Live workers and their last heartbeat (admin)",
                {200: _json({"type": "array", "items": _ref(WorkerReport)}, "the workers")},
                errors=(403,),
            ),
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics (admin)",
                {200: {"description": "text format", "content": {"text/plain": {}}}},
                errors=(403,),
            ),
        },
        "/healthz": {
            "get": _operation(
                "healthz", "Liveness", {200: _json(_ref(Health), "alive")}, public=True
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "Readiness: Redis answers and accepts writes",
                {200: _json(_ref(Health), "ready")},
                errors=(503,),
                public=True,
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "sandstream", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
