"""Lua scripts for the writes that must not half-happen.

Each one touches the keys of a single session (one hash tag) and, where a turn
is queued, started or ended, the queue's and the fleet's shared keys; it checks
the turn it acts for is still the session's current turn, and does the whole
write at once:
a stale worker, a reaper and an interrupt can race without corrupting a session.
"""

from __future__ import annotations

# KEYS: session, messages, seq[, job, queue, running].
# ARGV: turn_id, user message JSON, now, now_ms, tenant[, job payload, job score ms,
#       job expiry ms, wake channel, session id, reply channel or ''].
# -> {"ok", latest_seq} | {"running", running_turn_id} | {"missing"} (also: not the tenant's)
# With the job's keys, a claimed turn is queued in the same step, as arq's
# `enqueue_job` would (job record with expiry, queue entry), added to the
# running index, and idle workers are woken: a claimed turn is never left
# without its job, and the send costs one round trip. A reply channel (of the API
# process waiting for the turn) gets the terminal event too (FINISH_TURN).
CLAIM_TURN = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[5] then return {'missing'} end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'running' then
  return {'running', redis.call('HGET', KEYS[1], 'turn_id')}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'turn_id', ARGV[1], 'updated_at', ARGV[3],
           'claimed_ms', ARGV[4])
redis.call('HDEL', KEYS[1], 'started', 'interrupt', 'reply_to')
redis.call('RPUSH', KEYS[2], ARGV[2])
if ARGV[11] and ARGV[11] ~= '' then redis.call('HSET', KEYS[1], 'reply_to', ARGV[11]) end
if KEYS[4] then
  redis.call('PSETEX', KEYS[4], ARGV[8], ARGV[6])
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
  redis.call('SADD', KEYS[6], ARGV[10])
  redis.call('PUBLISH', ARGV[9], ARGV[1])
end
return {'ok', tostring(tonumber(redis.call('GET', KEYS[3]) or '0'))}
"""

# KEYS: session, lease, messages, metrics counters.
# ARGV: turn_id, worker_id, ttl_ms, the counter's field for turns started.
# -> {sandbox_id, agent JSON, messages} started | 0 not current (over, reaped,
#    or started elsewhere). Messages: the whole conversation, or only the turn's
#    user message when the session's `history` is "last" (the agent reads no more).
START_TURN = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'turn_id') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'started') then
  return 0
end
redis.call('HSET', KEYS[1], 'started', ARGV[2])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
local found = redis.call('HMGET', KEYS[1], 'sandbox_id', 'agent', 'history')
local first = 0
if found[3] == 'last' then first = -1 end
return {found[1], found[2], redis.call('LRANGE', KEYS[3], first, -1)}
"""

# KEYS: session, lease. ARGV: turn_id, worker_id, ttl_ms.
# -> 1 renewed | 2 renewed, interrupt requested | 0 lease lost or turn over
RENEW_LEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[2]
   or redis.call('HGET', KEYS[1], 'turn_id') ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'interrupt') == ARGV[1] then return 2 end
return 1
"""

# KEYS: for each turn of the batch, in order, its session, seq and log keys.
# ARGV: maxlen, log ttl ms, then for each turn: turn_id, channel, '1' on the
#       turn's first append (the log's expiry is set then; the turn's end renews
#       it) or '', its number of events n, then n times the event's type and its
#       JSON without seq and without its opening brace.
# -> per turn, the seq of its first event | 0 when the turn is no longer current
#    (none of its events is appended)
# One call carries the pending events of every turn a worker runs, so the
# script's own cost, the round trip and the seq counters (read once, written
# once) are paid per call rather than per turn; what stays per turn is the
# fence, one XADD per event and one PUBLISH of its events, one JSON a line. The
# arguments are flat rather than one encoded struct because this is the script
# that runs for every token: decoding a struct in Lua (cmsgpack) cost Redis
# about 1.3 µs more per event. The keys of many sessions in one script:
# sandstream runs on one primary.
APPEND_EVENTS = """
local call = redis.call
local batch = {}
local a = 3
while a <= #ARGV do
  local n = tonumber(ARGV[a + 3])
  batch[#batch + 1] = {ARGV[a], ARGV[a + 1], ARGV[a + 2] == '1', a + 4, a + 3 + 2 * n}
  a = a + 4 + 2 * n
end
local seq_keys = {}
for i = 1, #batch do seq_keys[i] = KEYS[3 * i - 1] end
local seqs = call('MGET', unpack(seq_keys))
local firsts = {}
local written = {}
local maxlen = ARGV[1]
for i = 1, #batch do
  local turn = batch[i]
  local k = 3 * i - 2
  if call('HGET', KEYS[k], 'turn_id') == turn[1] then
    local seq = tonumber(seqs[i]) or 0
    firsts[i] = seq + 1
    local log = KEYS[k + 2]
    local data
    local published = {}
    for j = turn[4], turn[5], 2 do
      seq = seq + 1
      data = '{"seq":' .. seq .. ',' .. ARGV[j + 1]
      call('XADD', log, 'MAXLEN', '~', maxlen, seq .. '-0', 't', ARGV[j], 'd', data)
      published[#published + 1] = data
    end
    if turn[3] then call('PEXPIRE', log, ARGV[2]) end
    if #published > 1 then data = table.concat(published, '\\n') end
    call('PUBLISH', turn[2], data)
    written[#written + 1] = KEYS[k + 1]
    written[#written + 1] = seq
  else
    firsts[i] = 0
  end
end
if #written > 0 then call('MSET', unpack(written)) end
return firsts
"""

# KEYS: session, messages, seq, log, lease, running index, recent durations, then
#       the counter hashes the turn adds to.
# ARGV: turn_id, mode, assistant message JSON or '', terminal event JSON without seq,
#       terminal type, maxlen, channel, now, log ttl ms, session id, duration ms or '',
#       n, then n events still to append before the terminal one (type, JSON without
#       seq), then per counter: KEYS index, field, increment, expiry seconds or 0.
# mode "worker": the running worker ends its turn.
# mode "unstarted": end a turn no worker has picked up (interrupt, queue timeout).
# mode "orphaned": end a started turn whose worker's lease has lapsed.
# -> seq of the terminal event | 0 when the condition does not hold (nothing written)
# The terminal event also goes to the reply channel the claim named, if any.
# The turn's last events, its end and what ops and metrics count of it are one
# step and one round trip.
FINISH_TURN = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'turn_id') ~= ARGV[1] then
  return 0
end
local started = redis.call('HGET', KEYS[1], 'started')
if ARGV[2] == 'unstarted' and started then return 0 end
if ARGV[2] == 'orphaned' and ((not started) or redis.call('EXISTS', KEYS[5]) == 1) then
  return 0
end
local reply_to = redis.call('HGET', KEYS[1], 'reply_to')
redis.call('HSET', KEYS[1], 'state', 'active', 'updated_at', ARGV[8])
redis.call('HDEL', KEYS[1], 'turn_id', 'started', 'interrupt', 'claimed_ms', 'reply_to')
if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[3]) end
redis.call('DEL', KEYS[5])
local n = tonumber(ARGV[12])
local seq = redis.call('INCRBY', KEYS[3], n + 1) - n - 1
local published = {}
local function append(event_type, json)
  seq = seq + 1
  local data = '{"seq":' .. seq .. ',' .. string.sub(json, 2)
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], seq .. '-0', 't', event_type, 'd', data)
  published[#published + 1] = data
end
for i = 13, 12 + 2 * n, 2 do append(ARGV[i], ARGV[i + 1]) end
append(ARGV[5], ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[9])
redis.call('PUBLISH', ARGV[7], table.concat(published, '\\n'))
if reply_to then redis.call('PUBLISH', reply_to, published[#published]) end
redis.call('SREM', KEYS[6], ARGV[10])
if ARGV[11] ~= '' then
  redis.call('LPUSH', KEYS[7], ARGV[11])
  redis.call('LTRIM', KEYS[7], 0, 999)
end
for i = 13 + 2 * n, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  redis.call('HINCRBY', key, ARGV[i + 1], ARGV[i + 2])
  if ARGV[i + 3] ~= '0' then redis.call('EXPIRE', key, ARGV[i + 3]) end
end
return seq
"""

# KEYS: session. ARGV: turn_id. -> 1 flagged | 0 not the running turn
FLAG_INTERRUPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'turn_id') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'interrupt', ARGV[1])
return 1
"""
