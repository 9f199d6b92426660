"""All configuration, read once from `SANDSTREAM_*` environment variables.

Every field has a default that is safe on a single machine; README documents each
one. Nothing else in the code base reads `os.environ` for service settings.
"""

from __future__ import annotations

import os
import re
from typing import Any

import msgspec

from shared.models import TOOL_NAMES, AgentConfig

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
    # a Redis command of the API that gets no answer within this fails (503)
    redis_socket_timeout_seconds: float = 10.0
    page_limit_max: int = 200
    # session log
    log_max_events: int = 10_000
    log_ttl_seconds: float = 604_800.0
    # turns
    max_iterations: int = 20
    max_output_tokens: int = 4096
    provider_max_retries: int = 2
    provider_timeout_seconds: float = 600.0
    turn_timeout_seconds: float = 3600.0
    system_prompt: str = (
        "You are an agent working in a sandbox. Use the tools to inspect and change "
        "files in the workspace and to run commands, then answer concisely."
    )
    tool_timeout_seconds: float = 120.0
    tool_output_bytes: int = 64 * 1024
    lease_seconds: float = 15.0
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
    # worker
    worker_max_jobs: int = 20
    worker_drain_seconds: int = 10
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
        )

    def __post_init__(self) -> None:
        if self.provider not in ("demo", "anthropic", "openai"):
            raise ValueError(f"provider must be demo, anthropic or openai, not {self.provider!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        for origin in self.cors_origin_list():
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"cors_origins: {origin!r} is not an origin (scheme://host[:port]) or *"
                )
        if self.public_url and not _ORIGIN.match(self.public_url.rstrip("/")):
            raise ValueError(f"public_url must be scheme://host[:port], not {self.public_url!r}")
        if not 0 < self.grant_seconds <= self.grant_max_seconds:
            raise ValueError("grant_seconds must be positive and at most grant_max_seconds")
        if not 0 < self.stream_token_seconds <= self.stream_grant_seconds:
            raise ValueError(
                "stream_token_seconds must be positive and at most stream_grant_seconds"
            )

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
