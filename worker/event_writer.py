"""EventWriter: the events of every turn a worker runs, appended in order, all
turns' pending events in one Redis call.

A turn's first append gets its seqs from the append script; after that the
writer knows them and sends each event with its seq, fenced by the turn's
appended mark (`SessionStore.append_batch`: by the script, or in a call of many
events by a transaction of plain commands). A call per
event, or per turn, would cost Redis a round trip and its bookkeeping per text
delta with hundreds of turns streaming at once; here one writer task per worker
sends whatever every turn has piled up as one call, so order is kept (one call
in flight at a time) while the turns go on producing. A busy writer starts its
calls a couple of milliseconds apart, so each carries many turns' events; one
whose turns stream by the hundred gathers for longer (up to
`SANDSTREAM_EVENT_GATHER_MAX_MS`), since each call costs Redis, the worker and
the API processes a share of their own whatever it carries. A turn's first
events never wait for that: they go out in the next call a couple of
milliseconds on.

Text deltas of one block that pile up behind a call in flight are joined into
one event: the text and its order are what clients get either way, and a
lagging writer catches up instead of falling further behind. With a text window
(`SANDSTREAM_TEXT_DELTA_WINDOW_MS`) a turn's deltas also wait out the window
after each send and go out joined: fewer events for Redis and the API, for some
delay after a turn's first token (which never waits). At a turn's end its part
is detached and what was not sent goes out with the terminal event, in the
script that ends the turn.

A store that cannot take a call now (down, stalled, out of memory) costs the
turns time, not their events: the call is sent again, with backoff, until it is
taken or none of its turns is this worker's any more (each turn's lease decides
how long that may last, `TurnRunner`). Each turn says how many of its events
are in the log already, so a call sent again after a lost reply appends nothing
twice (APPEND_EVENTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import weakref
from collections.abc import Callable

from shared.events import Event, TextDelta
from shared.store import SessionStore
from shared.turns import TurnAppend, until_stored

logger = logging.getLogger("sandstream.turn")

# Turns per call: bounds the call's arguments (Lua's `unpack` of the keys) and
# how long one call holds Redis.
MAX_TURNS_PER_CALL = 500
# Calls start at least this far apart. A writer that has been idle sends at
# once; a busy one gathers its turns' events for this long, so a call carries
# tens of turns (the call's fixed cost, about 20 µs of Redis CPU, and the
# round trip are then a small share of each event's) for about 1 ms of added
# latency on average (bench/README.md, "Streaming at scale").
MIN_CALL_INTERVAL = 0.002
# A busy writer gathers this long per turn that put events within the last
# STREAMING_WITHIN seconds (turns waiting on a tool or a slow model do not
# count: they would add delay to the others for nothing), between
# MIN_CALL_INTERVAL and its most (`SANDSTREAM_EVENT_GATHER_MAX_MS`, MAX_GATHER by default): with
# 200 turns streaming, calls 10 ms apart instead of 2 cost Redis a fifth less a
# chunk, and the worker and the API about an eighth, for about 6 ms more of
# added latency (bench/README.md, "A turn's end without copies, calls gathered
# by a busy writer").
GATHER_PER_TURN = 0.00005
STREAMING_WITHIN = 0.25
MAX_GATHER = 0.010


class TurnSuperseded(Exception):
    """The turn is no longer the session's current one (deleted, reaped)."""


class TurnEvents:
    """One turn's events on their way to the session log."""

    __slots__ = (
        "__weakref__",
        "_abandoned",
        "_detached",
        "_failure",
        "_held",
        "_on_superseded",
        "_stopped",
        "_writer",
        "appended",
        "in_flight",
        "last_seq",
        "pending",
        "put_at",
        "sending",
        "session_id",
        "taken_at",
        "turn_id",
    )

    def __init__(
        self,
        writer: EventWriter,
        session_id: str,
        turn_id: str,
        on_superseded: Callable[[], None],
    ) -> None:
        self._writer = writer
        self.session_id = session_id
        self.turn_id = turn_id
        self._on_superseded = on_superseded
        self.pending: list[Event] = []
        self.in_flight = False
        self.appended = 0  # the turn's events in the log so far
        self.last_seq: int | None = None  # the seq of the last of them, once known
        self.sending = 0  # events of the turn in the call in flight
        self._abandoned = False
        self._failure: BaseException | None = None
        self._stopped = False  # no more sending: the turn's end takes what is left
        self._detached = False
        self.taken_at = -math.inf  # when a call last took this turn's events (loop time)
        self.put_at = -math.inf  # when the turn last put an event (loop time)
        self._held = False  # text deltas wait for the text window (`EventWriter`)

    def put(self, event: Event) -> None:
        """Queue an event. After a failure events are dropped: the turn is being
        stopped (`on_superseded`), and `detach` reports why."""
        if self._failure is not None:
            return
        self.put_at = self._writer.loop.time()
        if self._detached:
            logger.warning("turn %s: an event after the turn's end was dropped", self.turn_id)
            return
        pending = self.pending
        writer = self._writer
        text = isinstance(event, TextDelta)
        if isinstance(event, TextDelta) and pending and (self._held or writer.sending):
            last = pending[-1]
            if isinstance(last, TextDelta) and last.index == event.index:
                last.text += event.text  # not sent yet: the pending list is never in flight
                return
        pending.append(event)
        if self._stopped:
            return
        if text and writer.text_window:
            due = self.taken_at + writer.text_window
            if due > writer.loop.time():
                if not self._held:
                    self._held = True
                    writer.loop.call_at(due, self._release)
                return
        self._held = False
        writer.ready(self)

    def _release(self) -> None:
        if self._held:
            self._held = False
            if self.pending and not self._stopped:
                self._writer.ready(self)

    def stop(self) -> None:
        """Send no more: the turn is about to end, and the events still to come go
        out with its terminal event (`detach`), in one round trip."""
        self._stopped = True
        self._writer.unready(self)
        self._writer.release(self)

    async def detach(self) -> list[Event]:
        """Stop sending: wait for a call carrying this turn's events, and hand back
        the events not sent yet, for the turn's end to append with its terminal
        event in the same round trip. Raises what made appending fail, if it did."""
        self.stop()
        while self.in_flight:
            await self._writer.call_done()
        self._detached = True
        if self._failure is not None:
            raise self._failure
        rest, self.pending = self.pending, []
        return rest

    def give_back(self, events: list[Event]) -> None:
        """Events `detach` handed out and nobody sent: kept (still unsent) for
        the turn's end, which detaches again."""
        self._detached = False
        self.pending = [*events, *self.pending]

    def abandon(self) -> None:
        """The turn is no longer this worker's: send nothing more of it, even in a
        call being sent again."""
        self._abandoned = True
        self.close()
        if self._failure is None:
            self._failure = TurnSuperseded()

    @property
    def abandoned(self) -> bool:
        return self._abandoned

    def close(self) -> None:
        """The turn is over: whatever it has not sent is dropped."""
        self.stop()
        self._detached = True
        self.pending = []

    def sent(self, first_seq: int) -> None:
        self.in_flight = False
        if first_seq == 0:
            self.failed(TurnSuperseded())
        elif first_seq < 0:
            self.failed(RuntimeError(f"events of turn {self.turn_id} appended out of order"))
        else:
            self.appended += self.sending
            self.last_seq = first_seq + self.sending - 1
        self.sending = 0

    def failed(self, failure: BaseException) -> None:
        self.in_flight = False
        if self._failure is None:
            self._failure = failure
            self.pending = []
            self._on_superseded()


class EventWriter:
    """The worker's one writer of turn events (see the module's docstring)."""

    def __init__(
        self,
        store: SessionStore,
        min_interval: float = MIN_CALL_INTERVAL,
        text_window: float = 0.0,
        max_gather: float = MAX_GATHER,
        gather_per_turn: float = GATHER_PER_TURN,
    ) -> None:
        self._store = store
        self._min_interval = min_interval
        self._max_gather = max_gather
        self._gather_per_turn = gather_per_turn
        # The turns that may still send (weakly: a turn dropped without its stop
        # leaves no trace); those streaming set how long a busy writer gathers.
        self._carried: weakref.WeakSet[TurnEvents] = weakref.WeakSet()
        # A turn's first events are ready: the next call goes at the floor.
        self._first = asyncio.Event()
        # A turn's text deltas go out at most once per window (seconds): those that
        # come sooner are joined into one event. The first after a quiet spell goes
        # at once. 0: every delta as soon as a call can take it.
        self.text_window = text_window
        self.loop = asyncio.get_running_loop()
        self._ready: dict[TurnEvents, None] = {}  # turns with events to send, in order
        self._has_work = asyncio.Event()
        self._call: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def open(self, session_id: str, turn_id: str, on_superseded: Callable[[], None]) -> TurnEvents:
        """A turn's events; `on_superseded` is called if the turn turns out not to
        be the session's current one, or appending fails."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        turn = TurnEvents(self, session_id, turn_id, on_superseded)
        self._carried.add(turn)
        return turn

    def release(self, turn: TurnEvents) -> None:
        """The turn sends no more (`TurnEvents.stop`)."""
        self._carried.discard(turn)

    def gather(self) -> float:
        """How far apart a busy writer starts its calls (seconds): longer the more
        of its turns stream (put events within STREAMING_WITHIN), at least the
        floor, at most the most."""
        since = self.loop.time() - STREAMING_WITHIN
        streaming = sum(1 for turn in self._carried if turn.put_at >= since)
        return max(self._min_interval, min(self._max_gather, streaming * self._gather_per_turn))

    @property
    def sending(self) -> bool:
        """A call is in flight: what is queued now waits for it to end."""
        return self._call is not None

    def ready(self, turn: TurnEvents) -> None:
        if turn not in self._ready:
            self._ready[turn] = None
            self._has_work.set()
        if turn.appended == 0 and not turn.in_flight:
            self._first.set()  # none of its events sent yet

    def unready(self, turn: TurnEvents) -> None:
        self._ready.pop(turn, None)

    async def call_done(self) -> None:
        """Wait for the call in flight, if any, to end."""
        if self._call is not None:
            await asyncio.shield(self._call)

    async def flushed(self) -> None:
        """Wait until the events queued so far are sent (but those of stopped
        turns, and those waiting out the text window)."""
        while self._ready or self._call is not None:
            if self._call is not None:
                await asyncio.shield(self._call)
            else:
                await asyncio.sleep(0.001)  # the writer takes them next, or gathers

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _append_until_taken(
        self, turns: list[TurnEvents], batch: list[TurnAppend]
    ) -> list[int]:
        return await until_stored(
            lambda: self._store.append_batch(batch),
            what=f"events of {len(turns)} turns",
            give_up=lambda: all(turn.abandoned for turn in turns),
            logger=logger,
        )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        started = 0.0
        while True:
            await self._has_work.wait()
            while True:
                gap = self._min_interval if self._first.is_set() else self.gather()
                wait = started + gap - loop.time()
                if wait <= 0:
                    break
                if gap <= self._min_interval:
                    await asyncio.sleep(wait)
                    break
                # A turn's first events cut a longer gather short (to the floor,
                # on the next turn of this loop).
                try:
                    async with asyncio.timeout(wait):
                        await self._first.wait()
                except TimeoutError:
                    # Over: uvloop's clock moves in whole milliseconds, so the
                    # wait worked out again could stay a hair above 0 until the
                    # next tick, each new timeout firing at once.
                    break
            started = loop.time()
            self._first.clear()
            self._has_work.clear()
            turns: list[TurnEvents] = []
            batch: list[TurnAppend] = []
            emptied: list[TurnEvents] = []  # since they were ready (a call failed)
            for turn in self._ready:
                if not turn.pending:
                    emptied.append(turn)
                    continue
                turn.taken_at = started
                turns.append(turn)
                # A turn's first append (none of its events in yet) sets the log's expiry.
                batch.append(
                    TurnAppend(
                        turn.session_id,
                        turn.turn_id,
                        turn.pending,
                        turn.appended == 0,
                        turn.appended,
                        turn.last_seq,
                    )
                )
                turn.sending = len(turn.pending)
                turn.pending = []
                turn.in_flight = True
                if len(turns) == MAX_TURNS_PER_CALL:
                    break
            for turn in (*turns, *emptied):
                del self._ready[turn]
            if self._ready:
                self._has_work.set()
            if not turns:  # the turns that were ready stopped before this call
                continue
            self._call = call = loop.create_future()
            try:
                firsts = await self._append_until_taken(turns, batch)
            except Exception as exc:
                logger.exception(
                    "appending events of %d turns failed (turns %s)",
                    len(turns),
                    ", ".join(t.turn_id for t in turns[:5]),
                )
                for turn in turns:
                    turn.failed(exc)
            except BaseException:
                for turn in turns:
                    turn.failed(RuntimeError("the worker's event writer stopped"))
                raise
            else:
                for turn, first in zip(turns, firsts, strict=True):
                    turn.sent(first)
            finally:
                self._call = None
                call.set_result(None)
