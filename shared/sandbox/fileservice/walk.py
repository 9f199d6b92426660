"""Walking a directory tree in a stable order, without following links, within a budget.

Listings page by a cursor, archives come out the same way twice, and two
snapshots of the workspace line up entry by entry: all because the walk goes
depth-first with each directory's names sorted, which is the order of their
paths' component tuples. Subdirectories are opened by name relative to their
parent's descriptor with O_NOFOLLOW, so a walk never leaves the tree.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator


class Budget:
    """How much a walk may examine, and for how long."""

    def __init__(self, entries: int, seconds: float) -> None:
        self.entries = entries
        self.deadline = time.monotonic() + seconds
        self.examined = 0
        self.stopped: str | None = None
        # The last position examined: where a walk its budget stopped can resume.
        self.last: tuple[str, ...] = ()

    def spend(self) -> bool:
        self.examined += 1
        if self.examined > self.entries:
            self.stopped = f"examined {self.entries} entries"
        elif self.examined % 256 == 0 and time.monotonic() > self.deadline:
            self.stopped = "ran out of time"
        return self.stopped is None


class Found:
    """One entry of a walk: its path parts below the top, its directory's
    descriptor (valid until the walk moves on) and its lstat."""

    __slots__ = ("dirfd", "info", "name", "parts")

    def __init__(self, parts: tuple[str, ...], dirfd: int, info: os.stat_result) -> None:
        self.parts = parts
        self.name = parts[-1]
        self.dirfd = dirfd
        self.info = info


def walk_sorted(
    top: int,
    budget: Budget,
    depth: int,
    after: tuple[str, ...] | None = None,
) -> Iterator[Found]:
    """Every entry under the open directory `top`, depth-first in sorted order,
    down to `depth` components; with `after`, only those that come after it
    (whole subtrees before it are skipped unread)."""
    yield from _walk(top, (), budget, depth, after)


def _walk(
    directory: int,
    parts: tuple[str, ...],
    budget: Budget,
    depth: int,
    after: tuple[str, ...] | None,
) -> Iterator[Found]:
    with os.scandir(directory) as scan:
        names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in scan)
    for name, is_dir in names:
        here = (*parts, name)
        inside = False
        if after is not None and here <= after:
            # At or before the cursor: only a directory holding the cursor is entered.
            inside = is_dir and after[: len(here)] == here
            if not inside:
                continue
        if budget.stopped is not None or not budget.spend():
            return
        budget.last = here
        if not inside:
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the directory was read
            yield Found(here, directory, info)
        if is_dir and len(here) < depth:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                child = os.open(name, flags, dir_fd=directory)
            except OSError:
                continue
            try:
                yield from _walk(child, here, budget, depth, after if inside else None)
            finally:
                os.close(child)
            if budget.stopped is not None:
                return
