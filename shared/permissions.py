"""Permissions: what a session's policy says of one tool call (allow, ask or deny).

`bash` may be ruled by its command line; the rules are globs, documented in the
README ("Approvals"). What happens to a call that is asked about is
`shared.approvals`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import msgspec

from shared.models import CommandRules, Permissions, Verdict


class Ruling(msgspec.Struct, frozen=True):
    """What a session's permissions say of one tool call, and which entry said it."""

    verdict: Verdict
    rule: str


# Where a shell command line chains another: each piece is checked against the
# deny and ask patterns on its own, so `ls; rm -rf x` is asked about like `rm -rf x`.
_CHAIN = re.compile(r"[;&|\n(){}`]|\$\(")


def rule_for(permissions: Permissions, name: str, tool_input: dict[str, Any]) -> Ruling:
    """The session's ruling on a call: the tool's own entry, else `*`, else allow."""
    if name in permissions:
        entry = permissions[name]
        where = name
    elif "*" in permissions:
        entry, where = permissions["*"], "*"
    else:
        return Ruling("allow", "default")
    if isinstance(entry, str):
        return Ruling(entry, where)
    command = tool_input.get("command")
    return command_ruling(entry, command if isinstance(command, str) else "")


def allowed_by_name(permissions: Permissions, name: str) -> bool:
    """Whether every call of this tool runs without asking, whatever its input."""
    for key in (name, "*"):
        if key in permissions:
            return permissions[key] == "allow"
    return True


def command_ruling(rules: CommandRules, command: str) -> Ruling:
    """deny, then ask, then allow; a command that matches none is asked about.

    Deny and ask patterns match the whole command line or any piece of it
    between shell operators; allow patterns match the whole line only. This is
    text matching, not a shell: `bash -c 'rm x'` is not `rm *`. Allow narrowly."""
    whole = command.strip()
    pieces = [whole, *(p.strip() for p in _CHAIN.split(whole) if p.strip())]
    for verdict, patterns in (("deny", rules.deny), ("ask", rules.ask)):
        for pattern in patterns:
            if any(_glob(pattern).fullmatch(piece) for piece in pieces):
                return Ruling(verdict, f"bash {verdict} {pattern!r}")  # type: ignore[arg-type]
    for pattern in rules.allow:
        if _glob(pattern).fullmatch(whole):
            return Ruling("allow", f"bash allow {pattern!r}")
    return Ruling("ask", "bash: no rule matched")


@lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    """`*` any run of characters (spaces and `/` too), `?` one; the rest literal."""
    parts = (re.escape(c) if c not in "*?" else (".*" if c == "*" else ".") for c in pattern)
    return re.compile("".join(parts), re.DOTALL)
