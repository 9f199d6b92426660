"""The turn lifecycle in Redis, and the terminal events of every way a turn ends.

A turn is claimed (API: user message stored, job queued), started (a worker
takes it and its lease), renewed (the worker's heartbeat, which also reads the
interrupt flag), appended to (its events, in order) and finished (message,
terminal event and the session's return to `active`, in one step). Each step is
one Lua script of `shared.scripts` that first checks the turn is still the
session's current one, so a stale worker, a reaper and an interrupt can race
without corrupting a session.

The terminal events are built here and nowhere else: `completed` and `failed`
for a turn that ran, and the endings decided from outside the turn (interrupted
before it started, lost with its worker, never picked up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    ExecAbortError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import events as ev
from shared import keys, metrics, scripts
from shared.metrics import TurnFigures
from shared.models import AgentConfig, FileChange, Message, new_id, now_rfc3339
from shared.queue import QueuedJob, finished_job_keys

T = TypeVar("T")
FinishMode = Literal["worker", "unstarted", "orphaned"]
FailedReason = Literal["error", "timeout", "worker_lost"]
CompletedReason = Literal["end_turn", "interrupted", "max_iterations"]

# Replies of a store that is there but cannot take this write now.
# What a Redis that is fine but cannot serve now answers: out of memory, a
# replica (after a failover), loading its data (`BusyLoadingError`, a connection
# error), busy with a script, without a primary or enough replicas. redis-py has
# classes for some; the others arrive as a `ResponseError` that starts with the
# reply's code.
_UNAVAILABLE_CLASSES = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionRefusedError,
    OutOfMemoryError,
    ReadOnlyError,
)
_UNAVAILABLE_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")

# A call goes in by a transaction of plain commands (`_append_watched`) when its
# events with seqs number this many or more, otherwise by the script. The
# transaction costs Redis less CPU an event but more a call: a round trip and
# two commands more. Bench 6b, "a call of N turns' deltas", puts the two even at
# about 8 events a call in CPU; at 16 the transaction takes a fifth less CPU an
# event for a tenth more commands, at 64 two fifths less for 4 % more. Small
# calls are those of a few streaming turns, where Redis has CPU to spare and the
# commands count more (a hosted Redis may bill them): with 20 turns streaming
# the script's way made 3.1-3.4 commands a chunk against 3.9-4.3 (bench 6).
WATCHED_MIN_EVENTS = 16

_message_decoder = msgspec.json.Decoder(Message)
_agent_decoder = msgspec.json.Decoder(AgentConfig)


def store_unavailable(exc: BaseException) -> bool:
    """Whether a Redis error says the store cannot take a call now (down, slow,
    full, read-only, loading, busy) rather than that the call was wrong: what a
    turn waits out and retries, and what the API answers with 503."""
    if isinstance(exc, _UNAVAILABLE_CLASSES):
        return True
    if isinstance(exc, ExecAbortError):
        # EXEC refused for what held as it ran (`TurnLifecycle._append_watched`):
        # "Transaction discarded because of: <the reply a command would get>".
        cause = str(exc).partition("because of: ")[2]
        return cause.startswith(("OOM", "READONLY", *_UNAVAILABLE_REPLIES))
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_UNAVAILABLE_REPLIES)
    return isinstance(exc, RedisError) and "out of memory" in str(exc).lower()


def worth_retrying(exc: BaseException) -> bool:
    """Whether a failed call may be asked again: the store cannot take it now,
    or the reply did not come in time."""
    return store_unavailable(exc) or isinstance(exc, TimeoutError)


async def until_stored(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    give_up: Callable[[], bool],
    logger: logging.Logger,
) -> T:
    """`call()`, asked again with backoff (50 ms, doubling to 1 s) while the store
    cannot take it, until it does or `give_up()`; then the last error is raised.
    Errors that do not say the store is away are raised at once."""
    pause = 0.05
    while True:
        try:
            return await call()
        except Exception as exc:
            if not worth_retrying(exc) or give_up():
                raise
            if pause == 0.05:
                logger.warning("the store refused %s (%r); asking again", what, exc)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


class ControlMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the API publishes on `keys.CONTROL_CHANNEL` to interrupt a turn;
    the worker running it stops it."""

    session_id: str
    turn_id: str


_control_encoder = msgspec.json.Encoder()
_control_decoder = msgspec.json.Decoder(ControlMessage)


def encode_control(message: ControlMessage) -> bytes:
    return _control_encoder.encode(message)


def decode_control(data: bytes) -> ControlMessage:
    return _control_decoder.decode(data)


class ClaimResult(msgspec.Struct):
    status: Literal["ok", "running", "missing"]
    turn_id: str | None = None
    latest_seq: int = 0


class TurnState(msgspec.Struct, kw_only=True):
    sandbox_id: str
    tenant: str
    agent: AgentConfig | None
    state: str
    turn_id: str | None
    started: bool
    claimed_ms: int
    lease_epoch: int = 0  # moves at every renewal of a started turn's lease
    # A resumed turn's continuation job (`shared.approvals`); else its job is the turn id.
    job_id: str | None = None
    # The turn waits for approval of tool calls.
    awaiting: bool = False


class IdemRecord(msgspec.Struct, kw_only=True):
    """An Idempotency-Key's record in Redis (`api.idempotency`)."""

    digest: str
    state: Literal["pending", "done"]
    resource_id: str = ""
    after: int = 0  # sends: the session's seq when the turn was claimed
    # pending: the request's own claim, so that its record is told apart from a
    # retry's with the same key and body (its claim expired, the retry took it)
    claim: str = ""


class Settlement(msgspec.Struct, frozen=True):
    """An Idempotency-Key's record (its Redis key, the request's digest, how long
    it is kept), settled in the same step as the effect it stands for: the
    claim that makes a turn (CLAIM_TURN), the write that makes a resource."""

    key: str
    digest: str
    ttl_seconds: int
    pending: bytes  # the request's record while pending: the key is still its own

    def done(self, resource_id: str) -> bytes:
        """The record once a resource is made (the claim writes a send's, with the
        seq it claimed at, in Lua)."""
        return msgspec.json.encode(
            IdemRecord(digest=self.digest, state="done", resource_id=resource_id)
        )


class TurnAppend(msgspec.Struct):
    """Events of one turn to append; `first`: the turn's first append (the log's
    expiry is set then); `appended_before`: its events in the log already;
    `last_seq`: the seq of the last of them, when the caller knows it (from an
    earlier append's reply): the events then go with their seqs (APPEND_EVENTS)."""

    session_id: str
    turn_id: str
    events: list[ev.Event]
    first: bool = False
    appended_before: int | None = None  # None: the caller does not count
    last_seq: int | None = None


_EVENT_TYPES = {
    cls: str(cls.__struct_config__.tag)
    for cls in (
        ev.TextDelta,
        ev.TextComplete,
        ev.ToolUseStart,
        ev.ToolUseComplete,
        ev.ToolResult,
        ev.ToolApprovalRequested,
        ev.ToolApprovalResolved,
    )
}


def _mark(turn_id: str, appended: int, last_seq: int) -> str:
    """A turn's appended mark (`keys.appended`): its events in the log, and the
    seq of the last of them."""
    return f"{turn_id} {appended} {last_seq}"


def _numbered(turn: TurnAppend, last_seq: int) -> list[tuple[str, str, bytes]]:
    """The turn's events as the log takes them after `last_seq`: each one's
    entry id, type and JSON with its seq (the line the live channel carries)."""
    return [
        (f"{seq}-0", _EVENT_TYPES[type(event)], b'{"seq":%d,%b' % (seq, ev.encode_event(event)[1:]))
        for seq, event in enumerate(turn.events, last_seq + 1)
    ]


class StartedTurn(msgspec.Struct, kw_only=True):
    sandbox_id: str
    agent: AgentConfig | None
    history: list[Message]  # the whole conversation, or its last message (START_TURN)


class FinishArgs(msgspec.Struct, kw_only=True):
    """The first argument of FINISH_TURN (decoded there with cjson); the texts
    follow it as arguments of their own (FINISH_TURN)."""

    turn_id: str
    mode: FinishMode
    terminal_type: str
    maxlen: int
    channel: str
    now: str
    log_ttl_ms: int
    session_id: str
    tally: str  # `metrics.Tally`'s JSON, pushed onto the tallies' list
    fold_at: int  # tallies kept before they are folded (`metrics.TALLY_FOLD_AT`)
    hash_count: int  # how many hashes a tally adds to (KEYS after the tallies' list)
    durations_kept: int
    first_bucket: int  # the number of the first bucket of outcomes in KEYS
    bucket_count: int  # how many
    job_id: str  # the job to forget with the turn's end ('' none)
    outcome_ttl: int
    epoch: int  # "orphaned": the lease epoch seen standing still
    worker_id: str  # "worker": the worker that must hold the turn's lease
    event_types: list[str]  # of the events before the terminal one


_finish_encoder = msgspec.json.Encoder()


# ---- the terminal events ------------------------------------------------------


class TurnIds(msgspec.Struct, frozen=True, kw_only=True):
    """What every event of one turn names."""

    session_id: str
    sandbox_id: str
    turn_id: str
    message_id: str

    def stamped(self) -> dict[str, str]:
        return {**msgspec.structs.asdict(self), "created_at": now_rfc3339()}


def completed(
    ids: TurnIds,
    message: Message,
    reason: CompletedReason,
    usage: ev.Usage,
    files_changed: list[FileChange] | None = None,
    files_changed_truncated: bool = False,
) -> ev.SessionCompleted:
    message.stop_reason = reason
    return ev.SessionCompleted(
        **ids.stamped(),
        message=message,
        stop_reason=reason,
        usage=usage,
        files_changed=files_changed or [],
        files_changed_truncated=files_changed_truncated,
    )


def failed(
    ids: TurnIds, reason: FailedReason, code: str, text: str, message: Message | None = None
) -> ev.SessionFailed:
    if message is not None:
        message.stop_reason = reason
    return ev.SessionFailed(
        **ids.stamped(),
        error=ev.ErrorInfo(code=code, message=text),
        stop_reason=reason,
        message=message,
    )


def new_turn_ids(sid: str, sandbox_id: str, turn_id: str) -> TurnIds:
    """The ids of a turn ended other than by its runner, with a new message id."""
    return TurnIds(session_id=sid, sandbox_id=sandbox_id, turn_id=turn_id, message_id=new_id())


LOST_TEXT = "the worker running this turn stopped responding"


# A session's turn fields; the agent last, since a reaper's pass does not read it.
_STATE_FIELDS = [
    "sandbox_id",
    "state",
    "turn_id",
    "started",
    "claimed_ms",
    "tenant",
    "lease_epoch",
    "job_id",
    "awaiting",
    "agent",
]
_LEASE_FIELDS = _STATE_FIELDS[:-1]


def _turn_state(row: list[bytes | None]) -> TurnState | None:
    """A TurnState from the session's `_STATE_FIELDS` (or `_LEASE_FIELDS`: no
    agent); None when the session does not exist."""
    sandbox_id, state, turn_id, started, claimed_ms, tenant, epoch, job, awaiting = row[:9]
    agent = row[9] if len(row) > 9 else None
    if sandbox_id is None or state is None:
        return None
    job = job or b""
    return TurnState(
        sandbox_id=sandbox_id.decode(),
        state=state.decode(),
        turn_id=turn_id.decode() if turn_id else None,
        started=started is not None,
        claimed_ms=int(claimed_ms or 0),
        agent=_agent_decoder.decode(agent) if agent else None,
        tenant=(tenant or b"").decode(),
        lease_epoch=int(epoch or 0),
        # Only the current turn's: a former turn's continuation may be named still.
        job_id=job.decode() if turn_id and job.startswith(turn_id + b":") else None,
        awaiting=awaiting is not None and awaiting == turn_id,
    )


class TurnLifecycle:
    """The turn's steps in Redis; `SessionStore` is one (with sandboxes and sessions)."""

    def __init__(
        self, redis: Redis, *, log_max_events: int = 10_000, log_ttl_seconds: float = 604_800
    ) -> None:
        self.redis = redis
        self.log_max_events = log_max_events
        # The log lives this long after its last event; a resume from before
        # what is left gets `log_truncated`, never a silent hole.
        self.log_ttl_ms = int(log_ttl_seconds * 1000)
        self.watched_min_events = WATCHED_MIN_EVENTS
        self.tally_fold_at = metrics.TALLY_FOLD_AT
        self._claim = scripts.register(redis, scripts.CLAIM_TURN)
        self._start = scripts.register(redis, scripts.START_TURN)
        self._renew = scripts.register(redis, scripts.RENEW_LEASE)
        self._append = scripts.register(redis, scripts.APPEND_EVENTS)
        self._finish = scripts.register(redis, scripts.FINISH_TURN)
        self._flag_interrupt = scripts.register(redis, scripts.FLAG_INTERRUPT)
        self._forget_running = scripts.register(redis, scripts.FORGET_RUNNING)

    async def claim_turn(
        self,
        sid: str,
        tenant: str,
        turn_id: str,
        user_message: Message,
        job: QueuedJob | None = None,
        reply_to: str = "",
        settles: Settlement | None = None,
    ) -> ClaimResult:
        """Make the session the tenant's new turn's, storing the user message, and
        queue `job` (the turn's) in the same step. `reply_to`: a pub/sub channel
        to publish the turn's terminal event on, besides the session's;
        `settles`: an Idempotency-Key's record, settled with the claim."""
        now = now_rfc3339()
        claim_keys = [keys.session(sid), keys.messages(sid), keys.seq(sid)]
        args: list[str | bytes | int] = [
            turn_id,
            msgspec.json.encode(user_message),
            now,
            int(time.time() * 1000),
            tenant,
        ]
        if job is not None:
            claim_keys += job.keys()
            args += [*job.args(), reply_to]
            if settles is not None:
                claim_keys.append(settles.key)
                args += [settles.digest, settles.ttl_seconds, settles.pending]
        elif settles is not None:
            raise ValueError("an Idempotency-Key is settled by a claim that queues its job")
        res = await self._claim(keys=claim_keys, args=args)
        status = res[0].decode()
        if status == "ok":
            return ClaimResult("ok", turn_id, int(res[1]))
        if status == "running":
            return ClaimResult("running", res[1].decode())
        return ClaimResult("missing")

    async def turn_state(self, sid: str) -> TurnState | None:
        row = await self.redis.hmget(keys.session(sid), _STATE_FIELDS)  # type: ignore[misc]
        return _turn_state(row)

    async def turn_states(self, sids: list[str]) -> list[TurnState | None]:
        """`turn_state` of each session without its agent (a system prompt may be
        long, and a reaper needs only the lease), all in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(keys.session(sid), _LEASE_FIELDS)
            rows = await pipe.execute()
        return [_turn_state(row) for row in rows]

    async def start_turn(self, sid: str, turn_id: str, worker_id: str) -> StartedTurn | None:
        """Take the turn and its lease; None when it is not this job's to run."""
        res = await self._start(
            keys=[keys.session(sid), keys.messages(sid), keys.METRICS_COUNTERS],
            args=[turn_id, worker_id, metrics.STARTED],
        )
        if not res:
            return None
        return StartedTurn(
            sandbox_id=res[0].decode(),
            agent=_agent_decoder.decode(res[1]) if res[1] else None,
            history=[_message_decoder.decode(m) for m in res[2]],
        )

    async def renew_lease(self, sid: str, turn_id: str, worker_id: str) -> int:
        """1 renewed, 2 renewed and an interrupt is asked for, 0 the turn is not ours."""
        return int(await self._renew(keys=[keys.session(sid)], args=[turn_id, worker_id]))

    async def flag_interrupt(self, sid: str, turn_id: str) -> bool:
        return bool(await self._flag_interrupt(keys=[keys.session(sid)], args=[turn_id]))

    async def append_events(
        self,
        sid: str,
        turn_id: str,
        events: list[ev.Event],
        appended_before: int | None = None,
        last_seq: int | None = None,
    ) -> list[int]:
        """Append one turn's events in order, in one script call: each gets its
        seq, or every one 0 when the turn is no longer current (and none is
        appended). With `appended_before` (the turn's events appended so far),
        sending a batch again after a lost reply appends nothing twice; with
        `last_seq` too, the events go with their seqs (`TurnAppend`)."""
        if not events:
            return []
        [first] = await self.append_batch(
            [TurnAppend(sid, turn_id, events, not appended_before, appended_before, last_seq)]
        )
        if first < 0:
            raise RuntimeError(f"events of turn {turn_id} appended out of order")
        return list(range(first, first + len(events))) if first else [0] * len(events)

    async def append_batch(self, turns: list[TurnAppend]) -> list[int]:
        """Append the events of several turns (each with at least one event, each
        turn once) in one step; per turn, the seq of its first event, 0
        when it is no longer current, -1 when `appended_before` does not match
        the log (none of its events appended either way). Sent again after a lost
        reply, a turn's events already in are not appended twice. When the turns
        whose seqs the caller gives carry WATCHED_MIN_EVENTS events or more, they
        go in by a transaction of plain commands (`_append_watched`), the others
        by the script (APPEND_EVENTS); a smaller call goes by the script whole."""
        if not turns:
            return []
        known = [t for t in turns if t.appended_before is not None and t.last_seq is not None]
        if known and sum(len(t.events) for t in known) >= self.watched_min_events:
            firsts = await self._append_watched(turns, known)
            if firsts is not None:
                return firsts
        return await self._append_scripted(turns)

    async def _append_scripted(self, turns: list[TurnAppend]) -> list[int]:
        script_keys, args = self.append_call(turns)
        return [int(first) for first in await self._append(keys=script_keys, args=args)]

    async def _append_watched(
        self, turns: list[TurnAppend], known: list[TurnAppend]
    ) -> list[int] | None:
        """`append_batch` without a script for the turns whose seqs the caller
        knows: their appended marks are watched and read; for each turn whose
        mark is the one it expects, its events go into the log with their seqs,
        and the turn's seq and mark are set, as plain commands in one
        transaction, with the call's other turns appended by the script in the
        same transaction. None when a watched mark changed before the
        transaction ran (nothing written: the caller sends the call to the script).

        Why: the script's way cost Redis about 1.7 times the CPU an event (bench
        6b: 5.6-8.2 µs against 3.4-3.8), as a script turns each of its arguments
        into a Lua string (hashing every byte) and each command's arguments and
        reply back again. The fence is the same: a turn whose mark is as
        expected is current, and its log ends at the seq it knows
        (APPEND_EVENTS); a turn that stops being current loses its mark in the
        same step, which WATCH sees.
        """
        marks = [keys.appended(turn.session_id) for turn in known]
        # A connection of the pool's own, not redis-py's pipeline: a watching
        # pipeline sends WATCH and MGET one round trip each; here they go as one.
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(
                connection.pack_commands([("WATCH", *marks), ("MGET", *marks)])
            )
            await connection.read_response()
            found = await connection.read_response()
            fast = set()
            for turn, mark in zip(known, found, strict=True):
                before, last = turn.appended_before, turn.last_seq
                assert before is not None and last is not None
                if mark == _mark(turn.turn_id, before, last).encode():
                    fast.add(id(turn))
            if not fast:
                await connection.send_packed_command(connection.pack_command("UNWATCH"))
                await connection.read_response()
                return None
            commands: list[tuple[str | int | bytes, ...]] = [("MULTI",)]
            written: list[str | int] = []
            lines: list[bytes] = []
            firsts: list[int] = []
            rest: list[TurnAppend] = []
            for turn in turns:
                if id(turn) not in fast:
                    rest.append(turn)
                    firsts.append(0)
                    continue
                sid, before, last = turn.session_id, turn.appended_before, turn.last_seq
                assert before is not None and last is not None
                log = keys.log(sid)
                maxlen = self.log_max_events
                for entry_id, kind, line in _numbered(turn, last):
                    commands.append(
                        ("XADD", log, "MAXLEN", "~", maxlen, entry_id, "t", kind, "d", line)
                    )
                    lines.append(line)
                n = len(turn.events)
                firsts.append(last + 1)
                written += [
                    keys.seq(sid),
                    last + n,
                    keys.appended(sid),
                    _mark(turn.turn_id, before + n, last + n),
                ]
            commands.append(("MSET", *written))
            if lines:
                commands.append(("PUBLISH", keys.LIVE_CHANNEL, b"\n".join(lines)))
            if rest:
                script_keys, args = self.append_call(rest)
                commands.append(
                    ("EVALSHA", self._append.sha, len(script_keys), *script_keys, *args)
                )
            commands.append(("EXEC",))
            await connection.send_packed_command(connection.pack_commands(commands))
            refused: ResponseError | None = None  # a command refused as queued (OOM)
            for _ in range(len(commands) - 1):
                try:
                    await connection.read_response()
                except ResponseError as exc:
                    refused = refused or exc
            try:
                replies = await connection.read_response()
            except ResponseError:
                if refused is not None:
                    raise refused from None
                raise
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        if replies is None:
            return None  # a watched mark changed: nothing was written
        for reply in replies[: len(replies) - bool(rest)]:
            if isinstance(reply, ResponseError):
                raise reply
        if rest:
            scripted = replies[-1]
            if isinstance(scripted, ResponseError):
                if not isinstance(scripted, NoScriptError):
                    raise scripted
                # Not loaded (a restarted or flushed store): the rest go now.
                scripted = await self._append_scripted(rest)
            got = iter(int(first) for first in scripted)
            firsts = [
                first if id(turn) in fast else next(got)
                for turn, first in zip(turns, firsts, strict=True)
            ]
        return firsts

    def append_call(self, turns: list[TurnAppend]) -> tuple[list[str], list[int | str | bytes]]:
        """The keys and arguments of the append script's call for `turns`."""
        script_keys: list[str] = []
        args: list[int | str | bytes] = [self.log_max_events, self.log_ttl_ms, keys.LIVE_CHANNEL]
        for turn in turns:
            sid, turn_id, before, last = (
                turn.session_id,
                turn.turn_id,
                turn.appended_before,
                turn.last_seq,
            )
            script_keys += [keys.session(sid), keys.seq(sid), keys.log(sid), keys.appended(sid)]
            n = len(turn.events)
            args += [turn_id, "1" if turn.first else "", n]
            if before is None or last is None:
                args += ["" if before is None else before, "", "", ""]
                for event in turn.events:
                    args.append(_EVENT_TYPES[type(event)])
                    # A copy, not a memoryview: redis-py sends each memoryview as a
                    # buffer of its own, and the packed call as one.
                    args.append(ev.encode_event(event)[1:])
                continue
            args += [before, _mark(turn_id, before, last), _mark(turn_id, before + n, last + n)]
            args.append(last + n)
            for entry in _numbered(turn, last):
                args += entry
        return script_keys, args

    async def finish_turn(
        self,
        sid: str,
        turn_id: str,
        mode: FinishMode,
        message: Message | None,
        terminal: ev.TerminalEvent,
        figures: TurnFigures | None = None,
        events: list[ev.Event] | None = None,
        epoch: int = 0,
        worker_id: str = "",
        job_id: str = "",
    ) -> int:
        """In one step: append `events` (the turn's last, not yet sent) and then the
        terminal event, store the message, free the session, and count the turn
        for ops and metrics (`figures`: what the turn measured, if it ran).
        Mode "worker" ends the turn only while `worker_id` holds its lease;
        `job_id` (mode "worker"): the arq job running the turn, forgotten in the
        same step but for its result (FINISH_TURN)."""
        assert not job_id or mode == "worker", "only the worker running a job ends it"
        figures = figures or TurnFigures()
        result, reason = (
            ("completed", str(terminal.stop_reason))
            if isinstance(terminal, ev.SessionCompleted)
            else ("failed", terminal.error.code)
        )
        now = time.time()
        buckets = metrics.outcome_buckets(now)
        outcome = f"{terminal.__struct_config__.tag}:{terminal.stop_reason}"
        tally = metrics.tally(result, reason, figures, outcome, metrics.outcome_bucket(now))
        script_keys = [
            keys.session(sid),
            keys.messages(sid),
            keys.seq(sid),
            keys.log(sid),
            keys.RUNNING,
            keys.TURN_DURATIONS,
            keys.appended(sid),
            keys.METRICS_TALLIES,
            *metrics.TALLIED,
            *map(keys.turn_outcomes, buckets),
            *(finished_job_keys(job_id) if job_id else ()),
        ]
        events = list(events or [])  # read twice below: types, then texts
        args = FinishArgs(
            turn_id=turn_id,
            mode=mode,
            terminal_type=str(terminal.__struct_config__.tag),
            maxlen=self.log_max_events,
            channel=keys.LIVE_CHANNEL,
            now=now_rfc3339(),
            log_ttl_ms=self.log_ttl_ms,
            session_id=sid,
            tally=_finish_encoder.encode(tally).decode(),
            fold_at=self.tally_fold_at,
            hash_count=len(metrics.TALLIED),
            durations_kept=metrics.DURATIONS_KEPT,
            first_bucket=buckets[0],
            bucket_count=len(buckets),
            job_id=job_id,
            outcome_ttl=metrics.OUTCOME_TTL_SECONDS,
            epoch=epoch,
            worker_id=worker_id,
            event_types=[str(e.__struct_config__.tag) for e in events],
        )
        texts = [
            b"" if message is None else msgspec.json.encode(message),
            *(ev.encode_event(e)[1:] for e in (terminal, *events)),
        ]
        return int(
            await self._finish(keys=script_keys, args=[_finish_encoder.encode(args), *texts])
        )

    # ---- endings decided from outside the turn --------------------------------

    async def interrupt_unstarted(self, sid: str, sandbox_id: str, turn_id: str) -> bool:
        """End a turn no worker has started yet as interrupted, with an empty reply."""
        ids = new_turn_ids(sid, sandbox_id, turn_id)
        message = Message(
            id=ids.message_id,
            session_id=sid,
            role="assistant",
            content=[],
            timestamp=now_rfc3339(),
            turn_id=turn_id,
        )
        terminal = completed(ids, message, "interrupted", ev.Usage())
        return bool(await self.finish_turn(sid, turn_id, "unstarted", message, terminal))

    async def end_orphaned(self, sid: str, sandbox_id: str, turn_id: str, epoch: int) -> bool:
        """End a started turn whose lease stood still at `epoch`: its worker is gone."""
        terminal = failed(
            new_turn_ids(sid, sandbox_id, turn_id), "worker_lost", "worker_lost", LOST_TEXT
        )
        return bool(await self.finish_turn(sid, turn_id, "orphaned", None, terminal, epoch=epoch))

    async def end_unstarted(
        self, sid: str, sandbox_id: str, turn_id: str, why: Literal["lost", "queue_timeout"]
    ) -> bool:
        """End a turn that never started: its worker died between taking the job
        and starting it, or no worker took it in time."""
        ids = new_turn_ids(sid, sandbox_id, turn_id)
        if why == "lost":
            terminal = failed(ids, "worker_lost", "worker_lost", LOST_TEXT)
        else:
            text = "no worker picked this turn up in time"
            terminal = failed(ids, "timeout", "queue_timeout", text)
        return bool(await self.finish_turn(sid, turn_id, "unstarted", None, terminal))

    # ---- the running index --------------------------------------------------

    async def running_sessions(self) -> list[str]:
        return [s.decode() for s in await self.redis.smembers(keys.RUNNING)]  # type: ignore[misc]

    async def forget_running(self, sid: str) -> bool:
        """Drop the session from the running index unless it runs a turn now."""
        return bool(await self._forget_running(keys=[keys.session(sid), keys.RUNNING], args=[sid]))
