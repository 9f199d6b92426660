"""API keys and tenants.

A bearer key names the tenant whose resources a request may touch (so does a
grant, for one session: `api.grants`). Keys are compared in constant time and
never logged; logs and Redis see only a key id, a prefix of the key's SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import msgspec

from api.grants import Grant
from shared.settings import Settings

TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
AUTH_OFF_TENANT = "default"


class Principal(msgspec.Struct, frozen=True):
    """Who is asking. `key_id` names the credential in budgets and logs; `grant`
    is set when it is a browser credential or stream token, not a key."""

    tenant: str
    admin: bool
    key_id: str
    grant: Grant | None = None


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    """The known keys. Lookups compare against every key, so timing says nothing."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        self._entries = [(key.encode(), principal) for key, principal in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, presented: str) -> Principal | None:
        candidate = presented.encode()
        found: Principal | None = None
        for key, principal in self._entries:
            if hmac.compare_digest(key, candidate):
                found = principal
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        pairs = _pairs(settings.api_keys, "SANDSTREAM_API_KEYS")
        if settings.api_keys_file:
            text = Path(settings.api_keys_file).read_text()
            lines = [ln.strip() for ln in text.splitlines()]
            pairs += _pairs(
                ",".join(ln for ln in lines if ln and not ln.startswith("#")),
                settings.api_keys_file,
            )
        entries = [(key, Principal(tenant, False, key_id(key))) for tenant, key in pairs]
        for name, key in _pairs(settings.admin_keys, "SANDSTREAM_ADMIN_KEYS", default="admin"):
            entries.append((key, Principal(name, True, key_id(key))))
        return cls(entries)


def _pairs(text: str, source: str, default: str | None = None) -> list[tuple[str, str]]:
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, key = item.partition("=")
        if not sep:
            if default is None:
                raise SystemExit(f"{source}: entries are tenant=key")
            name, key = default, item
        if not TENANT_NAME.match(name) or len(key) < 16:
            raise SystemExit(f"{source}: bad entry for {name!r} (names [A-Za-z0-9_.-], keys 16+)")
        pairs.append((name, key))
    return pairs
