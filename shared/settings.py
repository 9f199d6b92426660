"""All configuration, read once from `SANDSTREAM_*` environment variables.

Every field has a default that is safe on a single machine; README documents each
one. Nothing else in the code base reads `os.environ` for service settings.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import msgspec

from shared.models import (
    MAX_APPROVAL_TIMEOUT_SECONDS,
    TOOL_NAMES,
    AgentConfig,
    Permissions,
    check_permissions,
)

PREFIX = "SANDSTREAM_"
# An origin as browsers send it: no path, no wildcard (Litestar would read `*` as one).
_ORIGIN = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$"
)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: str = ""  # when the URL carries none
    redis_tls_ca_file: str = ""  # verifies a rediss:// server's certificate
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int = 1
    sandbox_root: str = ".sandstream/sandboxes"
    provider: str = "demo"
    model: str = ""
    # authentication and abuse limits
    auth: bool = True
    api_keys: str = ""
    api_keys_file: str = ""
    admin_keys: str = ""
    # browsers (api/grants.py, api/browser.py): a stream token opens its stream
    # for minutes, and resumes it (Last-Event-ID) across restarts for hours.
    stream_token_seconds: int = 300
    stream_grant_seconds: int = 14_400
    grant_seconds: int = 3600
    grant_max_seconds: int = 43_200
    stream_connects_per_minute: int = 600
    cors_origins: str = ""
    public_url: str = ""
    idempotency_seconds: int = 86_400
    # How long the first request with an Idempotency-Key may hold it undecided; a
    # request that died meanwhile (or whose store went away) lets a retry go first after it.
    idempotency_pending_seconds: float = 60.0
    rate_limit_per_minute: int = 600
    access_log: bool = False
    # HTTP limits
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    # the files API
    max_upload_bytes: int = 256 << 20
    archive_max_entries: int = 100_000
    archive_max_bytes: int = 1 << 30
    max_headers: int = 100
    send_wait_seconds: float = 300.0
    interrupt_wait_seconds: float = 5.0
    keepalive_seconds: float = 15.0
    # SSE streams: what one client may have pending, and how long it may accept
    # nothing before it is dropped (told to reconnect).
    stream_buffer_bytes: int = 1 << 20
    stream_write_timeout_seconds: float = 30.0
    page_limit_max: int = 200
    # session log
    log_max_events: int = 10_000
    log_ttl_seconds: float = 604_800.0
    # turns
    max_iterations: int = 20
    max_output_tokens: int = 4096
    provider_max_retries: int = 2
    provider_timeout_seconds: float = 600.0
    # A model stream that sends nothing (no response head, or no next byte)
    # for this long ends the turn with `provider_timeout` (README: Reliability).
    provider_idle_timeout_seconds: float = 90.0
    turn_timeout_seconds: float = 3600.0
    system_prompt: str = (
        "You are an agent working in a sandbox. Use the tools to inspect and change "
        "files in the workspace and to run commands, then answer concisely."
    )
    tool_timeout_seconds: float = 120.0
    tool_output_bytes: int = 64 * 1024
    # approvals (shared/approvals.py): the sessions' default permissions (JSON,
    # as `agent.permissions`), and how long an undecided tool call waits.
    tool_permissions: str = '{"*": "allow"}'
    approval_timeout_seconds: float = 3600.0
    # Leases (README: Reliability): a worker renews its turn's lease every third
    # of `lease_seconds`; a store stall or failover shorter than
    # `lease_grace_seconds` ends no turn; a worker that could not renew for
    # lease + grace stops its turn and its tools; the reaper ends a turn whose
    # lease stood still for lease + grace + a third of the lease.
    lease_seconds: float = 15.0
    lease_grace_seconds: float = 30.0
    # Every Redis call gives up after this long (a partition is then an error,
    # not a call that never returns): the API answers 503, a worker's calls take
    # at most a third of the lease if that is shorter.
    redis_socket_timeout_seconds: float = 5.0
    queued_turn_timeout_seconds: float = 3600.0
    # sandbox isolation
    allow_unisolated: bool = False
    sandbox_uid_base: int = 200_000
    sandbox_memory_bytes: int = 1 << 30
    sandbox_max_processes: int = 256
    sandbox_file_bytes: int = 256 << 20
    sandbox_cpus: float = 1.0
    sandbox_disk_bytes: int = 1 << 30
    sandbox_disk_inodes: int = 100_000
    sandbox_network_deny: str = ""
    # how long a sandbox's file service stays warm after a turn or request (0: never)
    sandbox_idle_seconds: float = 30.0
    # at most this many kept in one process, the oldest closed first
    sandbox_idle_max: int = 32
    # worker
    # What one worker process sustains of turns streaming from a model (50
    # chunks/s each) within 1.2x the model's pace (bench/README.md, streaming).
    worker_max_jobs: int = 200
    worker_drain_seconds: int = 10
    # A turn's text deltas go out at most once per this many ms, those arriving
    # sooner joined into one event: fewer, larger events for Redis and the API
    # at the price of up to this much delay after the first. 0: each at once.
    text_delta_window_ms: float = 0.0
    # A worker writes its turns' events in one Redis call every 2 ms or so; one
    # whose turns stream by the hundred gathers them for longer, 0.05 ms a turn
    # that put events in the last quarter second, up to this many ms: fewer,
    # larger calls (less CPU for Redis, the worker and the API a
    # chunk) for up to this much more delay. A turn's first events never wait
    # for it. 2 or less: every call as soon as 2 ms allow.
    event_gather_max_ms: float = 10.0
    worker_fallback_poll_seconds: float = 5.0
    worker_fast_pickup: bool = True
    reaper_interval_seconds: float = 5.0
    worker_heartbeat_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"

    def default_agent(self) -> AgentConfig:
        return AgentConfig(
            provider=self.provider,  # type: ignore[arg-type]  # checked in __post_init__
            model=self.model,
            system_prompt=self.system_prompt,
            allowed_tools=list(TOOL_NAMES),
            max_iterations=self.max_iterations,
            permissions=self.default_permissions(),
            approval_timeout_seconds=self.approval_timeout_seconds,
        )

    def default_permissions(self) -> Permissions:
        permissions: Permissions = msgspec.json.decode(self.tool_permissions, type=Permissions)
        check_permissions(permissions)
        return permissions

    def __post_init__(self) -> None:
        if self.provider not in ("demo", "anthropic", "openai"):
            raise ValueError(f"provider must be demo, anthropic or openai, not {self.provider!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if not 0 <= self.event_gather_max_ms < math.inf:
            raise ValueError("event_gather_max_ms must be a number of ms, not negative")
        if self.sandbox_idle_seconds < 0:
            raise ValueError("sandbox_idle_seconds must not be negative")
        if self.sandbox_idle_max < 0:
            raise ValueError("sandbox_idle_max must not be negative")
        for origin in self.cors_origin_list():
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin (scheme://host[:port]) or *"
                )
        if self.public_url and not _ORIGIN.match(self.public_url.rstrip("/")):
            raise ValueError(f"public_url must be scheme://host[:port], not {self.public_url!r}")
        try:
            self.default_permissions()
        except (msgspec.DecodeError, ValueError) as exc:
            raise ValueError(f"tool_permissions: {exc}") from None
        if not 0 < self.approval_timeout_seconds <= MAX_APPROVAL_TIMEOUT_SECONDS:
            raise ValueError(
                f"approval_timeout_seconds must be positive, at most {MAX_APPROVAL_TIMEOUT_SECONDS}"
            )
        if self.lease_seconds <= 0 or self.lease_grace_seconds < 0:
            raise ValueError("lease_seconds must be positive and lease_grace_seconds not negative")
        if self.idempotency_pending_seconds <= 0:
            raise ValueError("idempotency_pending_seconds must be positive")
        if self.idempotency_seconds <= 0:
            raise ValueError("idempotency_seconds must be positive")
        if self.redis_socket_timeout_seconds <= 0:
            raise ValueError("redis_socket_timeout_seconds must be positive")
        if self.provider_idle_timeout_seconds <= 0:
            raise ValueError("provider_idle_timeout_seconds must be positive")
        if not 0 < self.grant_seconds <= self.grant_max_seconds:
            raise ValueError("grant_seconds must be positive and at most grant_max_seconds")
        if not 0 < self.stream_token_seconds <= self.stream_grant_seconds:
            raise ValueError(
                "stream_token_seconds must be positive and at most stream_grant_seconds"
            )

    def fence_after_seconds(self) -> float:
        """How long a worker's turn goes on without a renewal of its lease getting
        through before it stops itself and its tools (`worker.turn`)."""
        return self.lease_seconds + self.lease_grace_seconds

    def lost_after_seconds(self) -> float:
        """How long a started turn's lease must stand still before a reaper ends
        it: a third of a lease after its worker fenced it."""
        return self.fence_after_seconds() + self.lease_seconds / 3

    def worker_socket_timeout(self) -> float:
        return min(self.redis_socket_timeout_seconds, self.lease_seconds / 3)

    def cors_origin_list(self) -> list[str]:
        """The origins whose pages may call the API (`*`: any, for development)."""
        return [part.strip().rstrip("/") for part in self.cors_origins.split(",") if part.strip()]

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            value = env.get(PREFIX + field.name.upper())
            if value is not None and value != "":
                raw[field.name] = value
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"invalid setting: {exc} (environment variables {PREFIX}*)") from exc
