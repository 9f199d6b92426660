"""The resources of the HTTP API and the store: sandboxes, sessions, messages.

Input types forbid unknown fields; the content block union is tagged on `type`.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Literal

import msgspec

ImageMediaType = Literal["image/png", "image/jpeg", "image/gif", "image/webp"]
Role = Literal["user", "assistant"]
SessionState = Literal["active", "running", "awaiting_approval"]
StopReason = Literal["end_turn", "interrupted", "max_iterations", "error", "timeout", "worker_lost"]

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 5


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def now_rfc3339() -> str:
    """UTC timestamp, RFC 3339 with millisecond precision and a `Z` suffix.

    Every event carries one: the date and time are formatted once a second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = second
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def rfc3339_of_ns(nanoseconds: int) -> str:
    """A file's timestamp (ns since the epoch) as RFC 3339, UTC, millisecond precision."""
    seconds, rest = divmod(nanoseconds, 1_000_000_000)
    moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{moment}.{rest // 1_000_000:03d}Z"


def new_id() -> str:
    return str(uuid.uuid4())


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


class TextBlock(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: NonEmptyStr


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", forbid_unknown_fields=True):
    id: NonEmptyStr
    name: NonEmptyStr
    input: dict[str, Any]


class ToolResultBlock(
    msgspec.Struct, tag="tool_result", tag_field="type", forbid_unknown_fields=True
):
    tool_use_id: NonEmptyStr
    content: str
    is_error: bool = False


# 5 MiB of image, base64-encoded: the most the model APIs accept per image.
MAX_IMAGE_BASE64 = 4 * ((5 * 1024 * 1024 + 2) // 3)


class ImageBlock(msgspec.Struct, tag="image", tag_field="type", forbid_unknown_fields=True):
    media_type: ImageMediaType
    data: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_IMAGE_BASE64)]

    def __post_init__(self) -> None:
        try:
            base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("`data` must be valid base64") from None


ContentBlock = TextBlock | ToolUseBlock | ToolResultBlock | ImageBlock
UserBlock = TextBlock | ImageBlock


FileType = Literal["file", "dir", "symlink"]


class FileChange(msgspec.Struct, kw_only=True):
    """A path a turn created, modified or deleted, as the files API names it;
    `size` is its size after the change (None when deleted; 0 for a directory)."""

    path: str
    change: Literal["created", "modified", "deleted"]
    type: FileType
    size: int | None


class Message(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    session_id: str
    role: Role
    content: list[ContentBlock]
    timestamp: str
    turn_id: str | None = None
    stop_reason: StopReason | None = None
    # On an assistant message that completed: what its turn changed in the
    # workspace, and whether that list is cut short (see `SessionCompleted`).
    files_changed: list[FileChange] | None = None
    files_changed_truncated: bool = False


ProviderName = Literal["demo", "anthropic", "openai"]
ToolName = Literal["bash", "read_file", "write_file", "edit_file", "list_files"]
TOOL_NAMES: tuple[ToolName, ...] = ("bash", "read_file", "write_file", "edit_file", "list_files")
MAX_ITERATIONS_LIMIT = 100

# Permissions: what happens when the model calls a tool (`shared.approvals`).
Verdict = Literal["allow", "ask", "deny"]
PermissionKey = Literal["*", "bash", "read_file", "write_file", "edit_file", "list_files"]
CommandPattern = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
PatternList = Annotated[list[CommandPattern], msgspec.Meta(max_length=100)]
MAX_APPROVAL_TIMEOUT_SECONDS = 7 * 86_400


class CommandRules(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Rules for `bash` by its command line: glob patterns (`*` any run of
    characters, `?` one), checked deny, then ask, then allow; a command that
    matches none is asked about."""

    deny: PatternList = msgspec.field(default_factory=list)
    ask: PatternList = msgspec.field(default_factory=list)
    allow: PatternList = msgspec.field(default_factory=list)


Permissions = dict[PermissionKey, Verdict | CommandRules]


def check_permissions(permissions: Permissions) -> None:
    """Command rules apply to `bash` alone: other tools have no command line."""
    for tool, rule in permissions.items():
        if isinstance(rule, CommandRules) and tool != "bash":
            raise ValueError(
                f"permissions.{tool}: command rules apply to bash only; use allow, ask or deny"
            )


class AgentConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The agent a session runs: fixed when the session is created, shown on it."""

    provider: ProviderName
    model: Annotated[str, msgspec.Meta(max_length=200)]
    system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)]
    allowed_tools: list[ToolName]
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=MAX_ITERATIONS_LIMIT)]
    permissions: Permissions = msgspec.field(default_factory=lambda: {"*": "allow"})
    approval_timeout_seconds: float = 3600.0

    @property
    def reads_history(self) -> bool:
        """Whether its provider is sent the whole conversation each turn. The demo
        agent answers the turn's own user message alone, so its turns load only that."""
        return self.provider != "demo"


class AgentOverride(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a client may set at session creation; omitted fields take the defaults."""

    provider: ProviderName | None = None
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    system_prompt: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    allowed_tools: Annotated[list[ToolName], msgspec.Meta(max_length=len(TOOL_NAMES))] | None = None
    max_iterations: Annotated[int, msgspec.Meta(ge=1, le=MAX_ITERATIONS_LIMIT)] | None = None
    permissions: Permissions | None = None
    approval_timeout_seconds: (
        Annotated[float, msgspec.Meta(gt=0, le=MAX_APPROVAL_TIMEOUT_SECONDS)] | None
    ) = None

    def __post_init__(self) -> None:
        if self.permissions is not None:
            check_permissions(self.permissions)

    def apply(self, default: AgentConfig) -> AgentConfig:
        """The effective config: this override over the service's defaults."""
        changes = {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not None}
        effective = msgspec.structs.replace(default, **changes)
        if "provider" in changes and "model" not in changes and self.provider != default.provider:
            effective.model = ""  # the default model belongs to the default provider
        return effective


class PendingApproval(msgspec.Struct, kw_only=True):
    """A tool call waiting for a person's decision, as `tool_approval_requested`
    announces it; `index` is the call's block in the assistant message."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    index: int
    expires_at: str


class ApprovalDecision(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of a decision on a tool call."""

    decision: Literal["allow", "deny"]
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class Session(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    sandbox_id: str
    state: SessionState
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    agent: AgentConfig | None = None
    turn_id: str | None = None
    # While the state is `awaiting_approval`: the tool calls not decided yet.
    pending_approvals: list[PendingApproval] | None = None


class SessionWithMessages(Session, kw_only=True):
    messages: list[Message]


class Sandbox(msgspec.Struct, kw_only=True):
    id: str
    metadata: dict[str, Any]
    network: bool = False
    created_at: str
    updated_at: str


class FileEntry(msgspec.Struct, kw_only=True):
    """A file, directory or symlink of a sandbox's workspace, as the files API lists it."""

    path: str  # relative to the workspace
    type: FileType
    size: int  # bytes (a symlink: its target's length; a directory: 0)
    modified_at: str


class FileWritten(msgspec.Struct, kw_only=True):
    """The answer to an upload; `sha256` is also the file's ETag."""

    path: str
    type: Literal["file"]
    size: int
    modified_at: str
    sha256: str


class ArchiveExtracted(msgspec.Struct, kw_only=True):
    path: str  # the directory extracted into
    entries: int
    size: int  # bytes written


# ---- request bodies -------------------------------------------------------


class CreateSandbox(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # Commands in the sandbox may reach the network only when this is set.
    network: bool = False


class CreateSession(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    agent: AgentOverride | None = None


class SendMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["user"]
    content: Annotated[list[UserBlock], msgspec.Meta(min_length=1, max_length=100)]


def text_of(blocks: list[ContentBlock]) -> str:
    return "".join(b.text for b in blocks if isinstance(b, TextBlock))


def check_metadata(metadata: dict[str, Any]) -> str | None:
    """Return a reason when metadata is too large or too deep to store, else None."""
    if len(msgspec.json.encode(metadata)) > MAX_METADATA_BYTES:
        return f"metadata must encode to at most {MAX_METADATA_BYTES} bytes of JSON"
    if _depth(metadata) > MAX_METADATA_DEPTH:
        return f"metadata may nest at most {MAX_METADATA_DEPTH} levels deep"
    return None


def _depth(value: Any) -> int:
    """How deep containers nest in `value` (iteratively: no recursion to exhaust)."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_METADATA_DEPTH:
            return deepest
        pending.extend((child, depth + 1) for child in children)
    return deepest
