"""Fleet-wide turn metrics, held in Redis, rendered in Prometheus' text format.

Workers add to these as each turn ends, in the script that ends it
(`SessionStore.finish_turn`), and count a turn as started in the script that
starts it; every API process renders them at `/metrics` next to
its own per-process HTTP and SSE series.

Why Redis and not a metrics port on each worker: workers open no listening port
(nothing to expose on a host that runs agents' commands, nothing to configure
in a process manager), a counter survives its worker's restart instead of
resetting, a worker that dies between two scrapes loses nothing it counted, and
one scrape of any API replica shows the whole fleet. The series are therefore
the same on every API replica: aggregate them with `max`, not `sum` (the alert
rules and dashboard in `deploy/` do).

What a turn's end adds (to the counters, the histograms, the recent durations
and its outcome's bucket for the ops report) goes in as one record, a tally
(`tally`), pushed onto a short list by the script that ends the turn: one
command there, where adding to each counter, bucket and sum was one each and
the duration two more (nine a turn, two more a tool call), about a sixteenth
of the Redis commands of a streamed turn of a hundred chunks. Every
TALLY_FOLD_AT tallies the same script folds them in (FOLD_TALLIES), so the list
stays short. Readers add the tallies not yet folded
to what the hashes hold, read together in one transaction (`read_folded`): a
scrape sees a turn's figures as soon as the turn has ended, and a fold between
two reads cannot count a tally twice or not at all. A tally is in Redis from
the moment its turn ends, in the same step, so a worker that dies loses none.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from itertools import accumulate
from typing import TYPE_CHECKING

import msgspec
from redis.asyncio import Redis

from shared import keys

if TYPE_CHECKING:
    from shared.ops import QueueReport

_SEP = "|"
# Where prometheus_client keeps each API process's figures when several uvicorn
# worker processes share one port (set by `api.__main__`, read at import).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Histogram(msgspec.Struct, frozen=True):
    name: str
    help: str
    label: str | None
    bounds: tuple[float, ...]

    def field(self, label_value: str, seconds: float) -> str:
        """The hash field of the bucket `seconds` falls in (buckets are not cumulative
        in Redis; the renderer accumulates them)."""
        index = bisect.bisect_left(self.bounds, seconds)
        return f"{label_value}{_SEP}{index}"


TURN_DURATION = Histogram(
    name="sandstream_turn_duration_seconds",
    help="Time from a worker starting a turn to its end.",
    label=None,
    bounds=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
FIRST_TOKEN = Histogram(
    name="sandstream_time_to_first_token_seconds",
    help="Time from a message's acceptance by the API to the turn's first text delta.",
    label=None,
    bounds=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOOL_DURATION = Histogram(
    name="sandstream_tool_duration_seconds",
    help="Time one tool call took in the sandbox.",
    label="tool",
    bounds=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
HISTOGRAMS = (TURN_DURATION, FIRST_TOKEN, TOOL_DURATION)

# Fields of the counters hash.
STARTED = "started"
EVENTS = "events"


def finished_field(result: str, reason: str) -> str:
    return f"finished{_SEP}{result}{_SEP}{reason}"


class TurnFigures(msgspec.Struct, kw_only=True):
    """What one turn adds to the fleet's metrics when it ends."""

    events: int = 0  # events the turn appended before its terminal event
    duration_seconds: float | None = None
    first_token_seconds: float | None = None
    tools: list[tuple[str, float]] = []


# The hashes a tally adds to, in the order its entries name them (1-based, as
# in Lua): the counters, then each histogram's. Tallies pending in Redis name
# them so across versions: a new hash goes at the end.
TALLIED = (keys.METRICS_COUNTERS, *(keys.metrics_histogram(h.name) for h in HISTOGRAMS))
# Tallies kept before the script that pushes one folds them all into the hashes.
TALLY_FOLD_AT = 64
# Recent turn durations kept for the ops report (FOLD_TALLIES trims to these).
DURATIONS_KEPT = 1000


# The buckets of turn outcomes a fold adds to (`keys.turn_outcomes`, each
# `keys.STATS_BUCKET_SECONDS` long): the hour the ops report reads, and the
# bucket after the folding process's own, for a worker whose clock is ahead. An
# outcome whose bucket is older by the time its tally is folded is past every
# report's hour, and is dropped.
OUTCOME_BUCKETS_BEFORE = 3600 // keys.STATS_BUCKET_SECONDS - 1
# How long a bucket of turn outcomes is kept once it has counts.
OUTCOME_TTL_SECONDS = 2 * 3600


class Tally(msgspec.Struct, array_like=True):
    """What one turn's end adds to the fleet's figures: its duration (for the
    ops report's recent durations, -1: not measured), its increments, each
    (1-based index in TALLIED, hash field, increment), and its outcome (`<terminal
    type>:<stop reason>`) with the bucket of the time it ended in. As JSON, an
    array, which the fold decodes in Lua."""

    duration_ms: int
    adds: list[tuple[int, str, int]]
    bucket: int
    outcome: str


def tally(result: str, reason: str, figures: TurnFigures, outcome: str, bucket: int) -> Tally:
    """The tally of a turn that ended: `increments` by hash, its duration and
    its outcome."""
    duration = figures.duration_seconds
    return Tally(
        duration_ms=-1 if duration is None else round(duration * 1000),
        adds=[
            (TALLIED.index(key) + 1, field, by)
            for key, field, by in increments(result, reason, figures)
        ],
        bucket=bucket,
        outcome=outcome,
    )


def outcome_bucket(now: float) -> int:
    """The bucket of turn outcomes `now` falls in."""
    return int(now) // keys.STATS_BUCKET_SECONDS


def outcome_buckets(now: float) -> list[int]:
    """The buckets of turn outcomes a fold at `now` adds to, oldest first."""
    bucket = outcome_bucket(now)
    return list(range(bucket - OUTCOME_BUCKETS_BEFORE, bucket + 2))


def last_hour_buckets(now: float) -> list[int]:
    """The buckets of turn outcomes the ops report reads at `now`: the last hour's."""
    return outcome_buckets(now)[:-1]


_tally_decoder = msgspec.json.Decoder(Tally)


class Folded(msgspec.Struct, kw_only=True):
    """The fleet's figures with the tallies not yet folded added."""

    hashes: list[dict[str, int]]  # in TALLIED's order
    durations: list[int]  # recent turn durations, ms, newest first
    outcomes: dict[str, int]  # turn outcomes over the buckets asked for


async def read_folded(redis: Redis, buckets: Sequence[int] = ()) -> Folded:
    """The tallied hashes, recent durations and the outcomes of `buckets` as the
    fold would leave them, read in one transaction with the tallies still
    pending: a fold in between cannot make a tally count twice or not at all."""
    async with redis.pipeline(transaction=True) as pipe:
        for key in TALLIED:
            pipe.hgetall(key)
        for bucket in buckets:
            pipe.hgetall(keys.turn_outcomes(bucket))
        pipe.lrange(keys.TURN_DURATIONS, 0, -1)
        pipe.lrange(keys.METRICS_TALLIES, 0, -1)
        *raw_hashes, raw_durations, raw_tallies = await pipe.execute()
    hashes = [{k.decode(): int(v) for k, v in raw.items()} for raw in raw_hashes]
    outcomes: dict[str, int] = {}
    for counts in hashes[len(TALLIED) :]:
        for name, count in counts.items():
            outcomes[name] = outcomes.get(name, 0) + count
    pending = []
    for raw in raw_tallies:
        try:
            record = _tally_decoder.decode(raw)
        except msgspec.DecodeError:
            continue  # as the fold leaves it out (FOLD_TALLIES)
        if record.duration_ms >= 0:
            pending.append(record.duration_ms)
        for index, field, by in record.adds:
            if 1 <= index <= len(TALLIED):  # else a hash of another version's
                fields = hashes[index - 1]
                fields[field] = fields.get(field, 0) + by
        if record.bucket in buckets:
            outcomes[record.outcome] = outcomes.get(record.outcome, 0) + 1
    durations = [*reversed(pending), *(int(d) for d in raw_durations)]
    return Folded(
        hashes=hashes[: len(TALLIED)], durations=durations[:DURATIONS_KEPT], outcomes=outcomes
    )


def increments(result: str, reason: str, figures: TurnFigures) -> list[tuple[str, str, int]]:
    """What a turn adds to the fleet's counters, as (hash key, field, increment).
    `result` is "completed" or "failed"; `reason` the stop reason of a completed
    turn or the error code of a failed one."""
    out = [
        (keys.METRICS_COUNTERS, finished_field(result, reason), 1),
        (keys.METRICS_COUNTERS, EVENTS, figures.events + 1),
    ]
    observations: list[tuple[Histogram, str, float]] = []
    if figures.duration_seconds is not None:
        observations.append((TURN_DURATION, "", figures.duration_seconds))
    if figures.first_token_seconds is not None:
        observations.append((FIRST_TOKEN, "", figures.first_token_seconds))
    observations.extend((TOOL_DURATION, tool, seconds) for tool, seconds in figures.tools)
    for hist, label_value, seconds in observations:
        key = keys.metrics_histogram(hist.name)
        out.append((key, hist.field(label_value, seconds), 1))
        out.append((key, f"{label_value}{_SEP}sum_us", round(seconds * 1_000_000)))
    return out


def render_fleet(figures: Folded, queue: QueueReport, workers_alive: int) -> str:
    """The fleet-wide series, in Prometheus' text exposition format."""
    counters, *hists = figures.hashes
    out: list[str] = []
    queue_label = f'{{queue="{keys.QUEUE}"}}'
    gauges = (
        ("sandstream_queue_depth", "Turns queued and waiting for a worker.", queue.queued),
        ("sandstream_queue_deferred", "Jobs deferred to a later time.", queue.deferred),
        ("sandstream_queue_in_progress", "Jobs a worker has taken.", queue.in_progress),
        (
            "sandstream_queue_oldest_age_seconds",
            "Age of the oldest queued turn (0 when none waits).",
            queue.oldest_queued_seconds,
        ),
    )
    for name, text, value in gauges:
        _header(out, name, text, "gauge")
        out.append(f"{name}{queue_label} {value}\n")
    for name, text, value in (
        ("sandstream_turns_running", "Turns in progress.", queue.running_turns),
        (
            "sandstream_turns_awaiting_approval",
            "Turns suspended until their tool calls are decided.",
            queue.awaiting_approval,
        ),
        ("sandstream_workers_alive", "Workers whose heartbeat is fresh.", workers_alive),
    ):
        _header(out, name, text, "gauge")
        out.append(f"{name} {value}\n")
    _counter(out, "sandstream_turns_started_total", "Turns workers started.", counters, STARTED)
    _counter(
        out,
        "sandstream_events_published_total",
        "Session events appended to logs and published.",
        counters,
        EVENTS,
    )
    for result, text in (("completed", "Turns completed"), ("failed", "Turns failed")):
        name = f"sandstream_turns_{result}_total"
        _header(out, name, f"{text}, by stop reason or error code.", "counter")
        prefix = finished_field(result, "")
        for field, count in sorted(counters.items()):
            if field.startswith(prefix):
                out.append(f'{name}{{reason="{_escape(field[len(prefix) :])}"}} {count}\n')
    for hist, fields in zip(HISTOGRAMS, hists, strict=True):
        _histogram(out, hist, fields)
    return "".join(out)


def _header(out: list[str], name: str, text: str, kind: str) -> None:
    out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")


def _counter(out: list[str], name: str, text: str, counters: dict[str, int], field: str) -> None:
    _header(out, name, text, "counter")
    out.append(f"{name} {counters.get(field, 0)}\n")


def _histogram(out: list[str], hist: Histogram, fields: dict[str, int]) -> None:
    _header(out, hist.name, hist.help, "histogram")
    label_values = sorted({field.rsplit(_SEP, 1)[0] for field in fields})
    if hist.label is None and not label_values:
        label_values = [""]
    for value in label_values:
        label = "" if hist.label is None else f'{hist.label}="{_escape(value)}"'
        buckets = [fields.get(f"{value}{_SEP}{i}", 0) for i in range(len(hist.bounds) + 1)]
        for bound, cumulative in zip([*hist.bounds, math.inf], accumulate(buckets), strict=True):
            le = "+Inf" if bound == math.inf else repr(float(bound))
            sep = "," if label else ""
            out.append(f'{hist.name}_bucket{{{label}{sep}le="{le}"}} {cumulative}\n')
        braces = f"{{{label}}}" if label else ""
        total = fields.get(f"{value}{_SEP}sum_us", 0) / 1_000_000
        out.append(f"{hist.name}_sum{braces} {total}\n")
        out.append(f"{hist.name}_count{braces} {sum(buckets)}\n")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
