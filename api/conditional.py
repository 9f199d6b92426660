"""Conditional requests and ranges (RFC 9110 §13 and §14), for the files API.

A file's ETag is its sha256, quoted: a strong validator that a client can also
compute itself. Only entity tags are compared (no dates): If-Match with strong
comparison, If-None-Match and If-Range-by-tag as the RFC says. One byte range
per request; a request for several gets the whole file (which the RFC allows).
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_DIGITS = re.compile(r"[0-9]{1,18}")
MAX_TAGS = 64

Tags = list[tuple[bool, str]] | Literal["*"]  # (weak, opaque value) each, or any


class Unsatisfiable(Exception):
    """A Range this file cannot satisfy (416)."""


class ByteRange(msgspec.Struct, frozen=True):
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def etag_of(sha256: str) -> str:
    return f'"{sha256}"'


def parse_tags(header: str | None) -> Tags | None:
    """An If-Match or If-None-Match value; None when absent. Unparsable parts
    end the list (what was read before them still counts)."""
    if header is None:
        return None
    if header.strip() == "*":
        return "*"
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(header) and len(tags) < MAX_TAGS:
        found = _TAG.match(header, position)
        if found is None:
            break
        tags.append((found.group(1) is not None, found.group(2)))
        position = found.end()
    return tags


def strong_values(tags: Tags) -> list[str] | Literal["*"]:
    """The values a strong comparison can match (If-Match): weak tags never do."""
    return "*" if tags == "*" else [value for weak, value in tags if not weak]


def any_values(tags: Tags) -> list[str] | Literal["*"]:
    """The values a weak comparison matches (If-None-Match)."""
    return "*" if tags == "*" else [value for _, value in tags]


def if_match_holds(tags: Tags | None, sha256: str) -> bool:
    if tags is None:
        return True
    values = strong_values(tags)
    return values == "*" or sha256 in values


def if_none_match_holds(tags: Tags | None, sha256: str) -> bool:
    """False when the client already has this version (GET/HEAD: 304)."""
    if tags is None:
        return True
    values = any_values(tags)
    return values != "*" and sha256 not in values


def if_range_holds(header: str | None, sha256: str) -> bool:
    """Whether a Range is to be honoured: without If-Range, yes; with one, only
    when it names this version by a strong tag (a date is not compared)."""
    if header is None:
        return True
    tags = parse_tags(header)
    return isinstance(tags, list) and len(tags) == 1 and tags[0] == (False, sha256)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range asked for; None to send the whole file (no Range, a
    unit other than bytes, or several ranges). Unsatisfiable for a malformed
    bytes range or one past the end."""
    if header is None:
        return None
    unit, equals, spec = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if (
        not dash
        or (first and not _DIGITS.fullmatch(first))
        or (last and not _DIGITS.fullmatch(last))
    ):
        raise Unsatisfiable
    if not first:  # the last N bytes
        if not last or int(last) == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(0, size - int(last)), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start or start >= size:
        raise Unsatisfiable
    return ByteRange(start, min(end, size - 1))
