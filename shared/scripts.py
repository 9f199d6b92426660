"""Lua scripts for the writes that must not half-happen.

Each one touches the keys of a single session (one hash tag) and, where a turn
is queued, started or ended, the queue's and the fleet's shared keys; it checks
the turn it acts for is still the session's current turn, and does the whole
write at once:
a stale worker, a reaper and an interrupt can race without corrupting a session.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

logger = logging.getLogger("sandstream.store")

# The sources of the scripts this process registered (`register`).
_registered: set[str] = set()


def register(redis: Redis, source: str) -> AsyncScript:
    """`redis.register_script`, the source kept for `load_registered`."""
    _registered.add(source)
    return redis.register_script(source)


def load_at_start(source: str) -> str:
    """`source`, kept for `load_registered` though it is registered only as it
    is first called."""
    _registered.add(source)
    return source


async def load_registered(redis: Redis) -> None:
    """Load every script registered so far into Redis (SCRIPT LOAD), in one round
    trip, as a process starts: its first calls then find them. Unloaded, each
    process's first burst of calls of a script is refused (NOSCRIPT) and loads
    it once per call in the burst (34 loads and as many refusals in the
    streaming benchmark's 200 turns). A store that restarts or flushes its
    scripts later costs such refusals again, as each script's calls find it
    gone. Best effort: a store away now only means the first calls load them."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for source in sorted(_registered):
                pipe.script_load(source)
            await pipe.execute()
    except RedisError as exc:
        # Not the error's whole text: Redis quotes the command, the script's source.
        reason = str(exc).split("\n", 1)[0][:120]
        logger.warning(
            "could not load the scripts ahead of their first calls (%s: %s)",
            type(exc).__name__,
            reason,
        )


# A Lua function for the scripts that settle an Idempotency-Key's record with
# the effect it stands for (CLAIM_TURN, SETTLE): unless another request holds
# the key by now (this one's `pending` expired, and a retry took it), whose
# record stays. -> true settled | false the key is another request's
SETTLE_IF_OURS = """
local function settle_if_ours(key, pending, record, ttl)
  local held = redis.call('GET', key)
  if held and held ~= pending then return false end
  redis.call('SET', key, record, 'EX', ttl)
  return true
end
"""

# KEYS: session, messages, seq[, job, queue, running[, idempotency record]].
# ARGV: turn_id, user message JSON, now, now_ms, tenant[, job payload, job score ms,
#       job expiry ms, wake channel, session id, reply channel or ''[, the
#       request's digest, the record's ttl s, the request's pending record]].
# -> {"ok", latest_seq} | {"running", running_turn_id} | {"missing"} (also: not the tenant's)
# With the job's keys, a claimed turn is queued in the same step, as arq's
# `enqueue_job` would (job record with expiry, queue entry), added to the
# running index, and idle workers are woken: a claimed turn is never left
# without its job, and the send costs one round trip. A reply channel (of the API
# process waiting for the turn) gets the terminal event too (FINISH_TURN).
# With an Idempotency-Key's record, the claim settles it (`api.idempotency`),
# unless another request holds the key by now (SETTLE_IF_OURS): a send whose
# reply was lost, sent again with its key, replays the turn it made instead of
# finding the session running.
CLAIM_TURN = (
    SETTLE_IF_OURS
    + """
local session = redis.call('HMGET', KEYS[1], 'tenant', 'state', 'turn_id', 'started',
                           'interrupt', 'lease_epoch', 'reply_to', 'job_id')
if session[1] ~= ARGV[5] then return {'missing'} end
if session[2] == 'running' then return {'running', session[3]} end
local fields = {'state', 'running', 'turn_id', ARGV[1], 'updated_at', ARGV[3],
                'claimed_ms', ARGV[4]}
local replying = ARGV[11] and ARGV[11] ~= ''
if replying then
  fields[#fields + 1] = 'reply_to'
  fields[#fields + 1] = ARGV[11]
end
redis.call('HSET', KEYS[1], unpack(fields))
-- What an earlier turn left of its own (a turn's end removes these; a session
-- whose turn was ended otherwise may keep some): deleted only when there, as a
-- send costs one command less so.
local stale = {}
for i, name in ipairs({'started', 'interrupt', 'lease_epoch', 'reply_to', 'job_id'}) do
  if session[3 + i] and not (replying and name == 'reply_to') then stale[#stale + 1] = name end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
redis.call('RPUSH', KEYS[2], ARGV[2])
if KEYS[4] then
  redis.call('PSETEX', KEYS[4], ARGV[8], ARGV[6])
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
  redis.call('SADD', KEYS[6], ARGV[10])
  redis.call('PUBLISH', ARGV[9], ARGV[1])
end
local latest = redis.call('GET', KEYS[3]) or '0'
if KEYS[7] then
  -- `after` as Redis keeps it: cjson would write a large number as a float
  local record = cjson.encode({digest = ARGV[12], state = 'done', resource_id = ARGV[1]})
  record = string.sub(record, 1, -2) .. ',"after":' .. latest .. '}'
  settle_if_ours(KEYS[7], ARGV[14], record, ARGV[13])
end
return {'ok', latest}
"""
)

# Settle an Idempotency-Key's record, queued in the transaction of the effect
# it stands for (a create). KEYS: the record. ARGV: this request's pending
# record, the settled one, ttl s. -> 1 settled | 0 the key is another request's
SETTLE = (
    SETTLE_IF_OURS
    + """
if settle_if_ours(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 1 end
return 0
"""
)

# KEYS: an Idempotency-Key's record. ARGV: the request's record while pending
# (unique to the request: it names a claim of its own).
# -> 1 dropped | 0 it is no longer that (settled, or another request's)
DROP_PENDING = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: session, messages, metrics counters.
# ARGV: turn_id, worker_id, the counter's field for turns started.
# -> {sandbox_id, agent JSON, messages} started | 0 not current (over, reaped,
#    or started elsewhere). Messages: the whole conversation, or only the turn's
#    user message when the session's `history` is "last" (the agent reads no more).
#    Sent again by the worker that started it (its reply was lost), the turn is
#    handed back as it is, not refused: refused, no one would run it.
# The lease is the pair (`started`: the worker, `lease_epoch`), kept in the
# session's hash with no expiry: it is the worker's renewals that keep it, as
# the reapers see it move, not a TTL on Redis's clock (README: Reliability).
START_TURN = """
local found = redis.call('HMGET', KEYS[1], 'state', 'turn_id', 'started', 'sandbox_id', 'agent',
                         'history')
if found[1] ~= 'running' or found[2] ~= ARGV[1] then return 0 end
local started = found[3]
if started and started ~= ARGV[2] then return 0 end
if not started then
  redis.call('HSET', KEYS[1], 'started', ARGV[2], 'lease_epoch', 1)
  redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
end
local first = 0
if found[6] == 'last' then first = -1 end
return {found[4], found[5], redis.call('LRANGE', KEYS[2], first, -1)}
"""

# KEYS: the worker's key, the workers' index.
# ARGV: the key's ttl in seconds, now (epoch seconds), the score below which
#       workers are forgotten, the worker's id, then its record's fields and values.
# Allowed when Redis is out of memory, as the lease renewal is: a full store must
# not make a healthy worker look dead to its liveness probe (which would restart
# it, ending its turns). Refreshing a record in place takes next to none.
WORKER_HEARTBEAT = """#!lua flags=allow-oom
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], 0, ARGV[3])
return 1
"""

# KEYS: session. ARGV: turn_id, worker_id.
# -> 1 renewed | 2 renewed, interrupt requested | 0 the turn is no longer this worker's
# Allowed when Redis is out of memory: bumping an existing counter takes none,
# and a full store must not cost a healthy turn its lease.
RENEW_LEASE = """#!lua flags=allow-oom
local found = redis.call('HMGET', KEYS[1], 'turn_id', 'started', 'interrupt')
if found[1] ~= ARGV[1] or found[2] ~= ARGV[2] then return 0 end
redis.call('HINCRBY', KEYS[1], 'lease_epoch', 1)
if found[3] == ARGV[1] then return 2 end
return 1
"""

# KEYS: for each turn of the batch, in order, its session, seq, log and appended keys.
# ARGV: maxlen, log ttl ms, the live channel (`keys.LIVE_CHANNEL`), then for
#       each turn: turn_id, '1' on the turn's first append (the log's expiry is
#       set then; the turn's end renews it) or '', its number of events n, how
#       many of its events the worker counts in the log already ('' when it does
#       not count), then
#       - when the worker knows the seq of its turn's last event: the appended
#         mark it expects, the mark once its events are in, and the seq of the
#         last of them; then n times the event's entry id (`<seq>-0`), its type
#         and its JSON, seq included, as the log and the live channel carry it;
#       - otherwise '', '', '', then n times the event's type and its JSON
#         without seq and without its opening brace (the script gives the seqs).
# -> per turn, the seq of its first event | 0 when the turn is no longer current
#    (none of its events is appended) | -1 when the worker's count does not match
#    the log's (nothing appended)
# One call carries the pending events of every turn a worker runs, so the
# script's own cost, the round trip and the counters (read once, written once)
# are paid per call rather than per turn; what stays per turn is one XADD per
# event. The call's events are published in one message on the live channel,
# one JSON a line, in the order of the turns in the call.
# The appended key (`<turn_id> <events> <last seq>`) makes a call that is sent
# again after a lost reply harmless: a turn whose events are in already gets its
# seqs again. It is also the fence after a turn's first append: the mark is
# removed wherever the turn stops being current, so only a turn without one
# (its first append) costs an HGET of the session.
# The seqs the worker gives are right while the mark is the one it expects:
# only this script appends to a log whose mark names a turn (the scripts that
# end or suspend the turn remove the mark as they append), and it sets the
# session's seq and the mark together (an append that does not count removes a
# mark naming its turn). So after a turn's first append, the script compares
# two strings and adds entries as they come, instead of reading the counter and
# building each entry's JSON and id: 4 to 6 µs of Redis CPU less an event
# (bench/README.md, "Streaming at scale").
# A call of many events with seqs (`turns.WATCHED_MIN_EVENTS`) runs no script for
# them: the worker writes the same entries, seqs and marks as plain commands in
# a transaction on the marks it read (`TurnLifecycle._append_watched`), which
# costs Redis about 40 % less CPU an event in large calls; a turn's first
# append, and any turn whose mark is not the one it expects, still comes here
# (in that transaction, or after it).
# The arguments are flat rather than one encoded struct because this is the
# script that runs for every token: decoding a struct in Lua (cmsgpack) cost
# Redis about 1.3 µs more per event. The keys of many sessions in one script:
# sandstream runs on one primary.
APPEND_EVENTS = """
local call = redis.call
local batch = {}
local read = {}
local a = 4
while a <= #ARGV do
  local n = tonumber(ARGV[a + 2])
  local known = ARGV[a + 4] ~= ''
  local i = #batch + 1
  local k = 4 * i - 3
  read[#read + 1] = KEYS[k + 3]
  local seq_at = 0
  if not known then
    read[#read + 1] = KEYS[k + 1]
    seq_at = #read
  end
  local width = known and 3 or 2
  batch[i] = {a, n, known, #read - (known and 0 or 1), seq_at, a + 7, a + 6 + width * n}
  a = a + 7 + width * n
end
local counters = call('MGET', unpack(read))
local firsts = {}
local written = {}
local lines = {}  -- what the live channel carries, in the order of the turns
local maxlen = ARGV[1]
for i = 1, #batch do
  local turn = batch[i]
  local h = turn[1]
  local turn_id, n = ARGV[h], turn[2]
  local k = 4 * i - 3
  local mark = counters[turn[4]]
  if turn[3] then
    if mark == ARGV[h + 4] then
      local log = KEYS[k + 2]
      for j = turn[6], turn[7], 3 do
        call('XADD', log, 'MAXLEN', '~', maxlen, ARGV[j], 't', ARGV[j + 1], 'd', ARGV[j + 2])
        lines[#lines + 1] = ARGV[j + 2]
      end
      firsts[i] = tonumber(ARGV[h + 6]) - n + 1
      written[#written + 1] = KEYS[k + 1]
      written[#written + 1] = ARGV[h + 6]
      written[#written + 1] = KEYS[k + 3]
      written[#written + 1] = ARGV[h + 5]
    elseif mark == ARGV[h + 5] then
      firsts[i] = tonumber(ARGV[h + 6]) - n + 1  -- in already: a call sent again
    elseif (mark and string.sub(mark, 1, #turn_id + 1) == turn_id .. ' ')
        or call('HGET', KEYS[k], 'turn_id') == turn_id then
      firsts[i] = -1
    else
      firsts[i] = 0
    end
  else
    local expected = tonumber(ARGV[h + 3])
    local before, last, marked = 0, 0, false
    if mark then
      local t, c, l = string.match(mark, '^(%S+) (%d+) (%d+)$')
      if t == turn_id then before, last, marked = tonumber(c), tonumber(l), true end
    end
    -- A mark naming the turn proves it current: each way a turn stops being the
    -- session's (FINISH_TURN, SUSPEND, deletion) removes the mark in the same step.
    if marked or call('HGET', KEYS[k], 'turn_id') == turn_id then
      if expected == nil or before == expected then
        local seq = tonumber(counters[turn[5]]) or 0
        firsts[i] = seq + 1
        local log = KEYS[k + 2]
        for j = turn[6], turn[7], 2 do
          seq = seq + 1
          local data = '{"seq":' .. seq .. ',' .. ARGV[j + 1]
          call('XADD', log, 'MAXLEN', '~', maxlen, seq .. '-0', 't', ARGV[j], 'd', data)
          lines[#lines + 1] = data
        end
        if ARGV[h + 1] == '1' then call('PEXPIRE', log, ARGV[2]) end
        written[#written + 1] = KEYS[k + 1]
        written[#written + 1] = seq
        if expected ~= nil then
          written[#written + 1] = KEYS[k + 3]
          written[#written + 1] = turn_id .. ' ' .. (before + n) .. ' ' .. seq
        elseif marked then
          -- An append that does not count moves the seq past the mark's: an
          -- append with seqs would find the mark it expects and send ids taken.
          call('DEL', KEYS[k + 3])
        end
      elseif before == expected + n then
        firsts[i] = last - n + 1
      else
        firsts[i] = -1
      end
    else
      firsts[i] = 0
    end
  end
end
if #lines > 0 then call('PUBLISH', ARGV[3], table.concat(lines, '\\n')) end
if #written > 0 then call('MSET', unpack(written)) end
return firsts
"""

# A Lua function for the scripts that append one session's events in one step
# (a turn's end, its suspension for approval, a decision): it appends `list`
# (each {type, JSON without seq and without its opening brace}) with the next
# seqs, renews the log's expiry, and publishes them as one message. The JSON
# comes without its brace so that each event's text is copied once in Lua: every
# string a script makes or receives costs Redis a few ns a byte (its hash), and
# the events at a turn's end carry the whole text.
# -> the last event's JSON and its seq (nil when `list` is empty)
APPEND_ALL = """
local function append_all(list, seq_key, log_key, maxlen, ttl_ms, channel)
  if #list == 0 then return nil end
  local n = #list
  local seq = redis.call('INCRBY', seq_key, n) - n
  local published = {}
  for _, item in ipairs(list) do
    seq = seq + 1
    local data = '{"seq":' .. seq .. ',' .. item[2]
    redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, seq .. '-0', 't', item[1], 'd', data)
    published[#published + 1] = data
  end
  redis.call('PEXPIRE', log_key, ttl_ms)
  redis.call('PUBLISH', channel, table.concat(published, '\\n'))
  return published[#published], seq
end
"""

# A Lua function that folds the tallies of turns that ended (`shared.metrics.Tally`,
# each a JSON array `[duration ms, [[hash index, field, increment], ...],
# outcome bucket, outcome]`) into the hashes they add to, the recent durations
# and the buckets of outcomes, and empties their list: one HINCRBY per field
# the tallies name together, one LPUSH of their durations (the newest first, as
# they ended; no more than `kept`) and one LTRIM to `kept`. `buckets` are the
# keys of the outcome buckets numbered `first` on; an outcome of another bucket
# is dropped (older: past the hour any report reads). A bucket that gains a
# field gets its expiry (counts only grow, so the field is new when its count
# is what was added).
# It cannot fail once the turn's end has written (FINISH_TURN): a tally it
# cannot read (not of that shape) it leaves out, and an entry naming a hash this
# version does not know, as `metrics.read_folded` does; its writes are
# `redis.pcall`s; and each increment is sent as an integer's digits (Lua holds
# numbers as doubles, which Redis writes as 1e+17 from there on), a sum nearing
# 2^53 sent before it grows past what a double holds exactly. The list is
# emptied whatever happened: no tally is folded twice.
FOLD_TALLIES = """
local exact = 2 ^ 53
local function integer(n)
  return type(n) == 'number' and n == math.floor(n) and math.abs(n) < 2 ^ 63
end
local function readable(tally)
  if type(tally) ~= 'table' or #tally ~= 4 or not integer(tally[1])
      or type(tally[2]) ~= 'table' or not integer(tally[3]) or type(tally[4]) ~= 'string' then
    return false
  end
  for _, entry in ipairs(tally[2]) do
    if type(entry) ~= 'table' or #entry ~= 3 or not integer(entry[1])
        or type(entry[2]) ~= 'string' or not integer(entry[3]) then
      return false
    end
  end
  return true
end
local function fold_tallies(tallies_key, durations_key, hashes, kept, buckets, first, ttl)
  local sums, order, took = {}, {}, {}
  local function write(at, field, by)
    local key = hashes[at] or buckets[at - #hashes]
    local count = redis.pcall('HINCRBY', key, field, string.format('%.0f', by))
    if at > #hashes and count == by then redis.pcall('EXPIRE', key, ttl) end
  end
  local function add(at, field, by)
    if math.abs(by) >= exact then return write(at, field, by) end
    local name = at .. ' ' .. field
    local sum = sums[name]
    if sum == nil then
      sum = 0
      order[#order + 1] = {at, field, name}
    elseif math.abs(sum + by) >= exact then
      write(at, field, sum)
      sum = 0
    end
    sums[name] = sum + by
  end
  for _, raw in ipairs(redis.call('LRANGE', tallies_key, 0, -1)) do
    local read, tally = pcall(cjson.decode, raw)
    if read and readable(tally) then
      if tally[1] >= 0 then took[#took + 1] = string.format('%.0f', tally[1]) end
      for _, entry in ipairs(tally[2]) do
        if hashes[entry[1]] then add(entry[1], entry[2], entry[3]) end
      end
      if buckets[tally[3] - first + 1] then add(#hashes + tally[3] - first + 1, tally[4], 1) end
    end
  end
  for _, entry in ipairs(order) do
    if sums[entry[3]] ~= 0 then write(entry[1], entry[2], sums[entry[3]]) end
  end
  if #took > 0 then
    redis.pcall('LPUSH', durations_key, unpack(took, math.max(1, #took - kept + 1)))
    redis.pcall('LTRIM', durations_key, 0, kept - 1)
  end
  redis.call('DEL', tallies_key)
end
"""

# KEYS: session, messages, seq, log, running index, recent durations, appended,
#       tallies, the hashes a tally adds to (`shared.metrics.TALLIED`), the
#       buckets of outcomes a fold adds to (`shared.metrics.outcome_buckets`),
#       then with a job id the job's keys (`shared.queue.finished_job_keys`).
# ARGV: a JSON document, `shared.turns.FinishArgs` (named members, no slots to
#       count); the assistant message's JSON or ''; the terminal event's JSON
#       without seq and without its opening brace; then each of `event_types`'
#       events so. The large texts are arguments of their own, not members of
#       the document: decoding them from it made a copy of each in Lua, about 40
#       µs of Redis CPU a turn for a reply of a hundred chunks (bench 6b).
# mode "worker": the running worker ends its turn, while it holds the lease (a
#   turn it suspended for approval, or that another worker resumed, is not its).
# mode "unstarted": end a turn no worker has picked up (interrupt, queue timeout).
# mode "orphaned": end a started turn whose lease epoch still is `epoch`: the
#   reaper saw it stand still long enough (a renewal since cancels this).
# -> seq of the terminal event | 0 when the condition does not hold (nothing written)
# The terminal event also goes to the reply channel the claim named, if any.
# With a job id (mode "worker": the arq job running the turn), the job is
# forgotten in the same step, as the claim queued it: its in-progress mark, try
# count and record deleted, its queue entry removed; arq stores its result as
# it returns (`FastPickupWorker.finish_job`): three commands where arq's forget
# script was four. Until then arq's own job API finds no such job (`Job.status()`
# not_found, `Job.result()` ResultNotFound): nothing of sandstream's asks it,
# a turn's outcome is its session's.
# The turn's last events, its end and what ops and metrics count of it are one
# step and one round trip.
FINISH_TURN = (
    APPEND_ALL
    + FOLD_TALLIES
    + """
local a = cjson.decode(ARGV[1])
-- Checked before any write: a script that fails halfway keeps what it wrote.
if #ARGV ~= 3 + #a.event_types then
  return redis.error_reply('ERR FINISH_TURN: ' .. #a.event_types .. ' event types, '
                           .. (#ARGV - 3) .. ' events')
end
local found = redis.call('HMGET', KEYS[1], 'state', 'turn_id', 'started', 'lease_epoch',
                         'reply_to')
if found[1] ~= 'running' or found[2] ~= a.turn_id then return 0 end
local started = found[3]
if a.mode == 'unstarted' and started then return 0 end
if a.mode == 'worker' and started ~= a.worker_id then return 0 end
if a.mode == 'orphaned' and ((not started) or tonumber(found[4] or '0') ~= a.epoch) then
  return 0
end
local reply_to = found[5]
-- The first write: one a full store refuses (OOM), so that the script writes
-- nothing then; after a first write Redis lets a script's others through.
redis.call('HSET', KEYS[1], 'state', 'active', 'updated_at', a.now)
if a.job_id ~= '' then
  local j = 9 + a.hash_count + a.bucket_count
  redis.call('DEL', KEYS[j], KEYS[j + 1], KEYS[j + 2])
  redis.call('ZREM', KEYS[j + 3], a.job_id)
end
-- `job_id`: a resumed turn's continuation (RESOLVE); the next turn's job is its own.
redis.call('HDEL', KEYS[1], 'turn_id', 'started', 'interrupt', 'claimed_ms', 'reply_to',
           'lease_epoch', 'job_id')
redis.call('DEL', KEYS[7])  -- the turn's appended mark: no append of it is current now
if ARGV[2] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[2]) end
local events = {}
for i, t in ipairs(a.event_types) do events[i] = {t, ARGV[3 + i]} end
events[#events + 1] = {a.terminal_type, ARGV[3]}
local last, seq = append_all(events, KEYS[3], KEYS[4], a.maxlen, a.log_ttl_ms, a.channel)
if reply_to then redis.call('PUBLISH', reply_to, last) end
redis.call('SREM', KEYS[5], a.session_id)
if redis.call('RPUSH', KEYS[8], a.tally) >= a.fold_at then
  local hashes, buckets = {}, {}
  for i = 1, a.hash_count do hashes[i] = KEYS[8 + i] end
  for i = 1, a.bucket_count do buckets[i] = KEYS[8 + a.hash_count + i] end
  fold_tallies(KEYS[8], KEYS[6], hashes, a.durations_kept, buckets, a.first_bucket,
               a.outcome_ttl)
end
return seq
"""
)

# KEYS: session. ARGV: turn_id. -> 1 flagged | 0 not the running turn
FLAG_INTERRUPT = """
local found = redis.call('HMGET', KEYS[1], 'state', 'turn_id')
if found[1] ~= 'running' or found[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'interrupt', ARGV[1])
return 1
"""

# One more use of a per-minute budget (requests, stream connections) in its
# window's counter; the window's first use sets the counter's expiry.
# KEYS: the window's counter. ARGV: its expiry, s. -> the count, this one included
COUNT_IN_WINDOW = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""

# Drop a session from the running index, unless it runs a turn again by now (a
# reaper read it before a new claim added it back: dropped then, no reaper would
# watch the new turn).
# KEYS: session, running index. ARGV: session id. -> 1 dropped | 0 running
FORGET_RUNNING = """
local found = redis.call('HMGET', KEYS[1], 'state', 'turn_id')
if found[1] == 'running' and found[2] then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
"""
