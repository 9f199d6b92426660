"""Every Redis key and channel sandstream uses, in one place.

Keys of one session share the hash tag `{<sid>}` and keys of one sandbox the tag
`{<sandbox id>}`, so the multi-key Lua scripts of a session stay on one slot.
"""

from __future__ import annotations

PREFIX = "ss"

# arq queue name; jobs and results live under arq's own prefixes.
QUEUE = f"{PREFIX}:queue"
# Published after every enqueue: idle workers wake at once instead of polling.
WAKE_CHANNEL = f"{PREFIX}:wake"
# Interrupt requests, read by every worker; the one running the turn acts.
CONTROL_CHANNEL = f"{PREFIX}:control"
# Every API process listens here for deleted sessions (`events.SessionDeleted`),
# to end their streams and waiting sends wherever they are.
DELETED_CHANNEL = f"{PREFIX}:api:deleted"
# Session ids with a turn in progress, scanned by the workers' reaper.
RUNNING = f"{PREFIX}:running"
# Session ids with a turn awaiting approval, scored by when its undecided calls
# time out (ms since the epoch), scanned by the workers' reaper.
APPROVAL_DEADLINES = f"{PREFIX}:approval-deadlines"
# Worker ids, scored by their last heartbeat (seconds since the epoch).
WORKERS = f"{PREFIX}:workers"
# Recent turn durations in ms, newest first, capped.
TURN_DURATIONS = f"{PREFIX}:stats:turn-durations"
# Turn outcomes are counted in buckets of this many seconds.
STATS_BUCKET_SECONDS = 600
# Written by the API's /readyz: Redis must take writes for the API to be ready.
READY_PROBE = f"{PREFIX}:api:ready-probe"
# Counter: sandboxes given a uid so far; each sandbox's uid is the base plus its
# value then, so no two sandboxes ever share one.
SANDBOX_UIDS = f"{PREFIX}:sandbox-uids"
# Hash: fleet-wide turn counters for Prometheus (`shared.metrics`).
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"
# List: what turns that ended add to the counters, histograms and recent
# durations, not yet folded into them (`shared.metrics.Tally`).
METRICS_TALLIES = f"{PREFIX}:metrics:tallies"


def metrics_histogram(name: str) -> str:
    """Hash: one histogram's bucket counts and sum, by label value (`shared.metrics`)."""
    return f"{PREFIX}:metrics:{name}"


def worker(worker_id: str) -> str:
    """Hash: a worker's host, pid, running turns and last heartbeat; expires with it."""
    return f"{PREFIX}:worker:{worker_id}"


def turn_outcomes(bucket: int) -> str:
    """Hash `<terminal type>:<stop reason>` -> count, for one time bucket."""
    return f"{PREFIX}:stats:turns:{bucket}"


def tenant_sandboxes(tenant: str) -> str:
    """Sorted set of a tenant's sandbox ids, scored by creation time."""
    return f"{PREFIX}:tenant:{{{tenant}}}:sandboxes"


def rate(key_id: str, minute: int) -> str:
    """Requests of one API key in one minute (fixed window), shared by all API replicas."""
    return f"{PREFIX}:rate:{key_id}:{minute}"


def idempotency(tenant: str, key_digest: str) -> str:
    """The outcome of the first request made with one Idempotency-Key."""
    return f"{PREFIX}:idem:{tenant}:{key_digest}"


def grant(digest: str) -> str:
    """What a stream token or browser credential allows, kept under the token's
    SHA-256 (never the token) for its lifetime (`api.grants`)."""
    return f"{PREFIX}:grant:{digest}"


def stream_connects(credential_id: str, minute: int) -> str:
    """Stream (re)connections of one key or grant in one minute: a budget of their
    own, apart from the REST requests counted by `rate`."""
    return f"{PREFIX}:stream-connects:{credential_id}:{minute}"


def sandbox(sandbox_id: str) -> str:
    return f"{PREFIX}:{{{sandbox_id}}}:sandbox"


def sandbox_sessions(sandbox_id: str) -> str:
    """Sorted set of the sandbox's session ids, scored by creation time."""
    return f"{PREFIX}:{{{sandbox_id}}}:sessions"


def session(sid: str) -> str:
    """Hash: the session record and its turn state."""
    return f"{PREFIX}:{{{sid}}}:session"


def messages(sid: str) -> str:
    """List of the session's messages, one JSON document each."""
    return f"{PREFIX}:{{{sid}}}:messages"


def seq(sid: str) -> str:
    """Counter: the seq of the session's latest event."""
    return f"{PREFIX}:{{{sid}}}:seq"


def log(sid: str) -> str:
    """Stream: the session's event log, entry id `<seq>-0`."""
    return f"{PREFIX}:{{{sid}}}:log"


def appended(sid: str) -> str:
    """`<turn_id> <events> <last seq>`: how many of its turn's events the worker's
    appends put in the log, so that one sent again is not appended twice."""
    return f"{PREFIX}:{{{sid}}}:appended"


def suspended(sid: str) -> str:
    """A turn awaiting approval, as its worker left it (`shared.approvals`)."""
    return f"{PREFIX}:{{{sid}}}:suspended"


def approvals(sid: str) -> str:
    """Hash: the waiting turn's tool calls by id, each pending or decided."""
    return f"{PREFIX}:{{{sid}}}:approvals"


# Sessions' live events go out on one channel shared by all sessions rather
# than a channel each: one call of a worker's event writer carries the events
# of all its turns, and publishes them in one message (each event names its
# session, by which the API routes it). An API process subscribes while it
# streams any session and skips the lines of others. One rather than a few
# hashed by session: with eight, each call published once on every channel its
# turns were on (5 or 6 a call at 200 turns, about 0.2 commands a chunk), while
# an API process following a few dozen sessions was on every channel anyway
# and heard the same lines, in more messages; only one following a handful
# heard fewer.
LIVE_CHANNEL = f"{PREFIX}:live:0"


def session_keys(sid: str) -> list[str]:
    # A turn's lease is held in the session's hash (`started`, `lease_epoch`).
    return [
        session(sid),
        messages(sid),
        seq(sid),
        log(sid),
        appended(sid),
        suspended(sid),
        approvals(sid),
    ]
