"""EventWriter: a turn's events, appended in order, several per Redis round trip.

Each append is a Lua call that assigns the event's seq. Awaiting them one at a
time costs a round trip per text delta and holds the turn loop back; here one
writer task sends whatever has piled up as a single pipeline, so order is kept
(one batch in flight at a time) while the loop goes on producing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from shared.events import Event
from shared.store import SessionStore

logger = logging.getLogger("sandstream.turn")


class TurnSuperseded(Exception):
    """The turn is no longer the session's current one (deleted, reaped)."""


class EventWriter:
    def __init__(
        self,
        store: SessionStore,
        session_id: str,
        turn_id: str,
        on_superseded: Callable[[], None],
    ) -> None:
        self._store = store
        self._session_id = session_id
        self._turn_id = turn_id
        self._on_superseded = on_superseded
        self._pending: list[Event] = []
        self._has_work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: BaseException | None = None
        self._task = asyncio.create_task(self._run())

    def put(self, event: Event) -> None:
        """Queue an event. After a failure events are dropped: the turn is being
        stopped (`on_superseded`), and `flush` reports why."""
        if self._failure is not None:
            return
        self._pending.append(event)
        self._idle.clear()
        self._has_work.set()

    async def flush(self) -> None:
        """Return once everything put so far is in the log."""
        await self._idle.wait()
        if self._failure is not None:
            raise self._failure

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            batch, self._pending = self._pending, []
            try:
                seqs = await self._store.append_events(self._session_id, self._turn_id, batch)
            except Exception as exc:
                logger.exception("appending events of turn %s failed", self._turn_id)
                self._fail(exc)
                return
            if 0 in seqs:
                self._fail(TurnSuperseded())
                return
            if not self._pending:
                self._idle.set()

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._idle.set()
        self._on_superseded()
