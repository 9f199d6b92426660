"""EventWriter: a turn's events, appended in order, several per Redis round trip.

The append script assigns each event its seq. Awaiting events one at a time
costs a round trip per text delta and holds the turn loop back; here one writer
task sends whatever has piled up as one script call, so order is kept (one batch
in flight at a time) while the loop goes on producing. At the turn's end the
writer is detached and what it has not sent goes out with the terminal event, in
the script that ends the turn.

A store that cannot take a batch now (down, stalled, out of memory) costs the
turn time, not its events: the batch is sent again, with backoff, until it is
taken. The turn's lease decides how long that may last (`TurnRunner`), and a
batch sent again after a lost reply is not appended twice (APPEND_EVENTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from shared.events import Event
from shared.store import SessionStore
from shared.turns import until_stored

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
        self._failure: BaseException | None = None
        self._not_sending = asyncio.Event()
        self._not_sending.set()
        self._stopped = False  # no more batches: the turn's end takes what is left
        self._detached = False
        self._appended = 0  # events of the turn in the log so far
        self._task = asyncio.create_task(self._run())

    def put(self, event: Event) -> None:
        """Queue an event. After a failure events are dropped: the turn is being
        stopped (`on_superseded`), and `detach` reports why."""
        if self._failure is not None:
            return
        if self._detached:
            logger.warning("turn %s: an event after the turn's end was dropped", self._turn_id)
            return
        self._pending.append(event)
        if not self._stopped:
            self._has_work.set()

    def stop(self) -> None:
        """Send no more batches: the turn is about to end, and the events still to
        come go out with its terminal event (`detach`), in one round trip."""
        self._stopped = True
        self._has_work.set()  # let the writer task see it and stop

    async def detach(self) -> list[Event]:
        """Stop sending: wait for the batch in flight and hand back the events not
        sent yet, for the turn's end to append with its terminal event in the same
        round trip. Raises what made appending fail, if it did."""
        self.stop()
        await self._not_sending.wait()
        self._detached = True
        if self._failure is not None:
            raise self._failure
        rest, self._pending = self._pending, []
        return rest

    def abandon(self) -> None:
        """The turn is no longer this worker's: stop sending, even mid-retry."""
        if self._failure is None:
            self._failure = TurnSuperseded()
        self._task.cancel()
        self._not_sending.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            if self._stopped:
                return
            batch, self._pending = self._pending, []
            self._not_sending.clear()
            try:
                seqs = await self._append_until_taken(batch)
            except Exception as exc:
                logger.exception("appending events of turn %s failed", self._turn_id)
                self._fail(exc)
                return
            finally:
                self._not_sending.set()
            if 0 in seqs:
                self._fail(TurnSuperseded())
                return
            self._appended += len(batch)

    async def _append_until_taken(self, batch: list[Event]) -> list[int]:
        return await until_stored(
            lambda: self._store.append_events(
                self._session_id, self._turn_id, batch, self._appended
            ),
            what=f"events of turn {self._turn_id}",
            give_up=lambda: False,  # `abandon` ends the wait
            logger=logger,
        )

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._on_superseded()
