"""Every Redis key name and every Lua script of the gateway.

Layout under a prefix P (default "gw"):

    P:ev:{id}              hash   s=state n=attempt number (current or next) i=integration
                                  t=received ms d=due ms (or when it ended); small values only,
                                  so Redis keeps it as a listpack (a hash with a large field
                                  costs 400 bytes more per event)
    P:rq:{id}              string the request: JSON head (method, url, headers) + "\\n" + body
    P:at:{id}              list   one JSON record per finished attempt
    P:lease                zset   id -> lease expiry ms, for in-flight events
    P:st:{integration}:{state}  zset  id -> received ms: the state index (the admin API reads it,
                                  and the reconciler walks the pending and retrying ones)
    P:idem:{integration}:{key}  string  first event id seen with that idempotency key
    P:int:{integration}    hash   the integration's health: state (active|paused), fails
                                  (consecutive failed attempts), w50/w90 (warnings sent this
                                  episode), last_error, last_failure_ms, last_success_ms,
                                  paused_ms, manual (paused by hand: no probes), probe_ms (next
                                  probe), cooldown_s, draining (a drain has taken held events and
                                  has not yet found the held index empty)
    P:drain:{integration}  string the lock of the one worker draining or probing it
    P:replay:{id}          hash   a bulk replay: status, matched, replayed, skipped, created_ms, filter
    P:replay:{id}:ids      list   the ids it still has to replay (matched when it was asked for)
    P:replays              set    the bulk replays still running
    P:workers              zset   worker id -> its last heartbeat (ms); live: within HEARTBEAT_TTL
    P:m:accepted           hash   metrics, cluster-wide: integration -> events accepted
    P:m:attempts           hash   integration|outcome -> finished attempts
    P:m:latency            hash   integration|bucket -> attempts (latency_sum: integration -> s)
    P:m:alerts             hash   kind -> alerts sent;  P:m:refused: reason -> inbound refused
    P:replay-idem:{key}    string the bulk replay started with that Idempotency-Key
    Held events are the index P:st:{integration}:held, in arrival order: its score is the received
    ms, made larger by 1/1024 steps when needed to sort an event after those held before it in
    the same millisecond (ACCEPT); TAKE_HELD keeps that score in the in_flight index, so that an
    event put back (RETURN_HELD, FINISH) returns to its exact place.
    P:queue                the arq queue; its jobs are `arq:job:{id}:{n}` and carry (id, n,
                           integration) only

An arq job is only a wake-up call for attempt n of an event: every state change is one of the
scripts below, and each checks the event's state and attempt number first (a fencing token), so a
stale, repeated or late job changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix


@dataclass(frozen=True)
class Keys:
    prefix: str

    def event(self, event_id: str) -> str:
        return f"{self.prefix}:ev:{event_id}"

    def request(self, event_id: str) -> str:
        return f"{self.prefix}:rq:{event_id}"

    def attempts(self, event_id: str) -> str:
        return f"{self.prefix}:at:{event_id}"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    def state_index(self, integration: str, state: str) -> str:
        return f"{self.prefix}:st:{integration}:{state}"

    def integration(self, name: str) -> str:
        return f"{self.prefix}:int:{name}"

    def drain_lock(self, name: str) -> str:
        return f"{self.prefix}:drain:{name}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def metric(self, name: str) -> str:
        return f"{self.prefix}:m:{name}"

    def replay(self, replay_id: str) -> str:
        return f"{self.prefix}:replay:{replay_id}"

    def replay_ids(self, replay_id: str) -> str:
        return f"{self.prefix}:replay:{replay_id}:ids"

    def replay_idempotency(self, key: str) -> str:
        return f"{self.prefix}:replay-idem:{key}"

    @property
    def running_replays(self) -> str:
        return f"{self.prefix}:replays"

    def idempotency(self, integration: str, key: str) -> str:
        return f"{self.prefix}:idem:{integration}:{key}"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @staticmethod
    def job_id(event_id: str, attempt: int) -> str:
        return f"{event_id}:{attempt}"

    @staticmethod
    def arq_job(job_id: str) -> str:
        return job_key_prefix + job_id


# Lua keeps the same layout; ARGV[1] is always the prefix. Redis runs Lua 5.1 (no goto).
# Each command costs Redis 3-7 us per event here (a SET with an expiry the most), so the hot
# scripts use as few as the invariants allow: ACCEPT one per event and three per batch, CLAIM six,
# FINISH six to nine.
_PRELUDE = f"""
local P = ARGV[1]
local function ev(id) return P .. ':ev:' .. id end
local function rq(id) return P .. ':rq:' .. id end
local function at(id) return P .. ':at:' .. id end
local function st(integ, s) return P .. ':st:' .. integ .. ':' .. s end
local function job(jid) return '{job_key_prefix}' .. jid end
local function int(name) return P .. ':int:' .. name end
local RETRY_PREFIX = '{retry_key_prefix}'
local PROGRESS_PREFIX = '{in_progress_key_prefix}'
"""

# ARGV: prefix, queue, now, idempotency ttl ms, count, lengths, data.
# `data` holds, per event, five fields back to back: id, integration, idempotency key (may be
# empty), request blob, arq job bytes; `lengths` lists their byte lengths, comma-separated. (Two
# arguments instead of five per event: redis-py packs each argument in Python.)
# The arq job key gets no expiry: arq deletes it when the job ends, and an expiring key costs
# Redis more than the rest of the event's write.
# Returns per event: the id and 0 (new) or the first id and 1 (a repeat).
ACCEPT = (
    _PRELUDE
    + """
local queue, now, idem_px, count = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local lens = {}
for n in string.gmatch(ARGV[6], '%d+') do lens[#lens + 1] = tonumber(n) end
local data, pos, li = ARGV[7], 1, 0
local function take()
  li = li + 1
  local s = string.sub(data, pos, pos + lens[li] - 1)
  pos = pos + lens[li]
  return s
end
-- Writes are grouped across the batch (one MSET, one ZADD per sorted set) because each
-- redis.call costs more than the work it does for one small key.
local out, seen, strings, queued, indexed, holds, last, accepted = {}, {}, {}, {}, {}, {}, {}, {}
-- An integration holds new events while it is paused, and while it drains what it held (they
-- wait behind the held ones, so arrival order is kept). The drain takes held events off the held
-- index before it sends them, so an empty index alone does not mean the drain is over: `draining`
-- stays set until the drain finds nothing left to take.
local function holding(integ)
  local h = holds[integ]
  if h == nil then
    local f = redis.call('HMGET', int(integ), 'state', 'draining')
    local top = redis.call('ZREVRANGE', st(integ, 'held'), 0, 0, 'WITHSCORES')
    h = f[1] == 'paused' or f[2] ~= false or #top > 0
    holds[integ] = h
    last[integ] = tonumber(top[2] or 0)
  end
  return h
end
-- A held event's score: its received ms, or, when that would not sort it after every event held
-- before it (several in one millisecond), the last score + 1/1024 (a step that a double keeps
-- exactly below 2^43 ms, the year 2248). Ids sort by millisecond only, so a tie of scores would
-- order same-millisecond events at random.
local function held_score(integ)
  local score = math.max(tonumber(now), last[integ] + 1 / 1024)
  last[integ] = score
  return string.format('%.17g', score)
end
local function index(integ, state, id, score)
  local key = st(integ, state)
  local list = indexed[key]
  if not list then
    list = {}
    indexed[key] = list
  end
  list[#list + 1] = score
  list[#list + 1] = id
end
for k = 1, count do
  local id, integ, idem, blob, jobdata = take(), take(), take(), take(), take()
  local first = false
  if idem ~= '' then
    local ik = P .. ':idem:' .. integ .. ':' .. idem
    first = seen[ik] or redis.call('GET', ik)
    if not first then
      redis.call('SET', ik, id, 'PX', idem_px)
      seen[ik] = id
    end
  end
  if first then
    out[#out + 1] = first
    out[#out + 1] = 1
  else
    strings[#strings + 1] = rq(id)
    strings[#strings + 1] = blob
    accepted[integ] = (accepted[integ] or 0) + 1
    if holding(integ) then
      redis.call('HSET', ev(id), 's', 'held', 'n', '1', 'i', integ, 't', now, 'd', now)
      index(integ, 'held', id, held_score(integ))
    else
      redis.call('HSET', ev(id), 's', 'pending', 'n', '1', 'i', integ, 't', now, 'd', now)
      local jid = id .. ':1'
      strings[#strings + 1] = job(jid)
      strings[#strings + 1] = jobdata
      queued[#queued + 1] = now
      queued[#queued + 1] = jid
      index(integ, 'pending', id, now)
    end
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
if #strings > 0 then redis.call('MSET', unpack(strings)) end
if #queued > 0 then redis.call('ZADD', queue, unpack(queued)) end
for key, list in pairs(indexed) do redis.call('ZADD', key, unpack(list)) end
for integ, n in pairs(accepted) do redis.call('HINCRBY', P .. ':m:accepted', integ, n) end
return out
"""
)

# ARGV: prefix, id, n, now, lease ms. Moves a due event to in_flight when attempt n is the
# current one; returns {integration, received ms, request blob}, nil for a stale job, or "held"
# when its integration is paused or still draining held events (the event then waits, held, in
# arrival order).
CLAIM = (
    _PRELUDE
    + """
local id, n, now, lease = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
local s = f[1]
if (s ~= 'pending' and s ~= 'retrying') or f[2] ~= n then return false end
local h = redis.call('HMGET', int(f[3]), 'state', 'draining')
if h[1] == 'paused' or h[2] or redis.call('ZCARD', st(f[3], 'held')) > 0 then
  -- paused, or still draining what it held: this attempt waits its turn among the held
  redis.call('HSET', ev(id), 's', 'held')
  redis.call('ZREM', st(f[3], s), id)
  redis.call('ZADD', st(f[3], 'held'), f[4], id)
  return 'held'
end
redis.call('HSET', ev(id), 's', 'in_flight')
redis.call('ZADD', P .. ':lease', now + lease, id)
redis.call('ZREM', st(f[3], s), id)
redis.call('ZADD', st(f[3], 'in_flight'), f[4], id)
return {f[3], f[4], redis.call('GET', rq(id))}
"""
)

# ARGV: prefix, queue, id, n, now, outcome (delivered|dead|retrying), attempt record,
#       due ms, arq job bytes, retention ms of a terminal event,
#       "1" when only an expired lease may be finished (the reconciler),
#       health: "S" a success, "F" a failure that counts, "-" neither (a lost worker),
#       failure threshold, last error, first probe cool-down s,
#       where a retry waits: "retrying" (scheduled) or "held" (a drained event keeps its place),
#       the latency bucket index ("" when nothing was sent) and the latency in seconds.
# Counts the integration's consecutive failures, and pauses it at the threshold. A retry of a
# paused integration is held instead of scheduled. Returns 0 when attempt n is no longer the one in
# flight (nothing is changed), else {1, final state, consecutive failures, 1 if the integration is
# now paused, signals...}, the signals being warn50, warn90 and paused (each once per episode).
FINISH = (
    _PRELUDE
    + """
local queue, id, n, now, outcome = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
if f[1] ~= 'in_flight' or f[2] ~= n then return 0 end
if ARGV[11] == '1' then
  local lease = redis.call('ZSCORE', P .. ':lease', id)
  if lease and tonumber(lease) > now then return 0 end
end
local ik = int(f[3])
local out = {1, outcome, 0, 0}
if ARGV[12] == 'S' then
  redis.call('HSET', ik, 'fails', 0, 'last_success_ms', now)
  redis.call('HDEL', ik, 'w50', 'w90')
elseif ARGV[12] == 'F' then
  local fails = redis.call('HINCRBY', ik, 'fails', 1)
  out[3] = fails
  redis.call('HSET', ik, 'last_error', ARGV[14], 'last_failure_ms', now)
  local threshold = tonumber(ARGV[13])
  if fails * 2 >= threshold and redis.call('HSETNX', ik, 'w50', 1) == 1 then out[#out + 1] = 'warn50' end
  if fails * 10 >= threshold * 9 and redis.call('HSETNX', ik, 'w90', 1) == 1 then out[#out + 1] = 'warn90' end
  if fails >= threshold and redis.call('HGET', ik, 'state') ~= 'paused' then
    local cooldown = tonumber(ARGV[15])
    redis.call('HSET', ik, 'state', 'paused', 'paused_ms', now, 'manual', 0,
               'cooldown_s', cooldown, 'probe_ms', now + cooldown * 1000)
    out[#out + 1] = 'paused'
  end
end
local paused = redis.call('HGET', ik, 'state') == 'paused'
if paused then out[4] = 1 end
if outcome == 'retrying' and (ARGV[16] == 'held' or paused) then
  outcome = 'held'
  out[2] = outcome
end
-- Metrics: attempts by outcome, and the latency histogram (ARGV 17: bucket index, 18: seconds).
redis.call('HINCRBY', P .. ':m:attempts', f[3] .. '|' .. outcome, 1)
if ARGV[17] ~= '' then
  redis.call('HINCRBY', P .. ':m:latency', f[3] .. '|' .. ARGV[17], 1)
  redis.call('HINCRBYFLOAT', P .. ':m:latency_sum', f[3], ARGV[18])
end
redis.call('RPUSH', at(id), ARGV[7])
redis.call('ZREM', P .. ':lease', id)
local score = f[4]
if outcome == 'held' then
  -- back to its place: TAKE_HELD kept its held score (finer than the received ms) in in_flight
  score = redis.call('ZSCORE', st(f[3], 'in_flight'), id) or f[4]
end
redis.call('ZREM', st(f[3], 'in_flight'), id)
redis.call('ZADD', st(f[3], outcome), score, id)
local nn = tostring(tonumber(n) + 1)
if outcome == 'retrying' then
  local due = ARGV[8]
  redis.call('HSET', ev(id), 's', 'retrying', 'n', nn, 'd', due)
  local jid = id .. ':' .. nn
  redis.call('SET', job(jid), ARGV[9])
  redis.call('ZADD', queue, due, jid)
elseif outcome == 'held' then
  redis.call('HSET', ev(id), 's', 'held', 'n', nn, 'd', now)
else
  redis.call('HSET', ev(id), 's', outcome, 'd', now)
  redis.call('PEXPIRE', ev(id), ARGV[10])
  redis.call('PEXPIRE', rq(id), ARGV[10])
  redis.call('PEXPIRE', at(id), ARGV[10])
end
return out
"""
)

# ARGV: prefix, integration, count, now, lease ms, "1" for a probe.
# Moves the oldest held events (up to count; one for a probe) to in_flight, in arrival order, under
# a lease like any attempt. A drain needs the integration active; a probe needs it paused (not by
# hand) and its probe due, and moves the next probe one lease later so no other worker probes too.
# A drain marks the integration `draining` while it takes events, so that ACCEPT keeps holding new
# ones while the last batch is still being sent, and clears the mark when nothing is left to take.
# Returns a flat list of id, attempt, received ms, request blob.
TAKE_HELD = (
    _PRELUDE
    + """
local integ, count, now, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ik = int(integ)
local h = redis.call('HMGET', ik, 'state', 'manual', 'probe_ms')
if ARGV[6] == '1' then
  if h[1] ~= 'paused' or h[2] == '1' or tonumber(h[3] or 0) > now then return {} end
  count = 1
  redis.call('HSET', ik, 'probe_ms', now + lease)
elseif h[1] == 'paused' then
  return {}
end
local ids = redis.call('ZRANGE', st(integ, 'held'), 0, count - 1, 'WITHSCORES')
local out = {}
for k = 1, #ids, 2 do
  local id = ids[k]
  local f = redis.call('HMGET', ev(id), 's', 'n', 't')
  if f[1] == 'held' then
    redis.call('HSET', ev(id), 's', 'in_flight')
    redis.call('ZREM', st(integ, 'held'), id)
    -- the held score, so that RETURN_HELD and FINISH can put it back in its exact place
    redis.call('ZADD', st(integ, 'in_flight'), ids[k + 1], id)
    redis.call('ZADD', P .. ':lease', now + lease, id)
    out[#out + 1] = id
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
    out[#out + 1] = redis.call('GET', rq(id))
  else
    redis.call('ZREM', st(integ, 'held'), id)
  end
end
if ARGV[6] ~= '1' then
  if #out > 0 then
    redis.call('HSET', ik, 'draining', 1)
  else
    redis.call('HDEL', ik, 'draining')
  end
end
return out
"""
)

# ARGV: prefix, integration, then pairs of id, attempt. Puts events that TAKE_HELD took but that
# were never sent back where they were, held, with no attempt counted.
RETURN_HELD = (
    _PRELUDE
    + """
local integ = ARGV[2]
for k = 3, #ARGV, 2 do
  local id = ARGV[k]
  local f = redis.call('HMGET', ev(id), 's', 'n', 't')
  if f[1] == 'in_flight' and f[2] == ARGV[k + 1] then
    redis.call('HSET', ev(id), 's', 'held')
    redis.call('ZREM', P .. ':lease', id)
    local score = redis.call('ZSCORE', st(integ, 'in_flight'), id) or f[3]
    redis.call('ZREM', st(integ, 'in_flight'), id)
    redis.call('ZADD', st(integ, 'held'), score, id)
  end
end
return 1
"""
)

# ARGV: prefix, integration, now, "pause" or "resume", "1" if by hand.
# Returns {previous state, held count}. A resume clears the failure count and the episode; the
# held events then drain, oldest first.
SET_STATE = (
    _PRELUDE
    + """
local integ, now = ARGV[2], ARGV[3]
local ik = int(integ)
local before = redis.call('HGET', ik, 'state') or 'active'
if ARGV[4] == 'pause' then
  if before ~= 'paused' or ARGV[5] == '1' then
    redis.call('HSET', ik, 'state', 'paused', 'paused_ms', now, 'manual', ARGV[5])
  end
else
  redis.call('HSET', ik, 'state', 'active', 'fails', 0)
  redis.call('HDEL', ik, 'w50', 'w90', 'manual', 'probe_ms', 'cooldown_s', 'paused_ms')
end
return {before, redis.call('ZCARD', st(integ, 'held'))}
"""
)

# ARGV: prefix, index key, cutoff score, limit. Retention: removes from a delivered or dead index
# the entries received before the cutoff whose event has expired (its keys carry the retention TTL
# from when it ended); entries of events still kept stay for a later pass. Returns how many went.
TRIM = (
    _PRELUDE
    + """
local ids = redis.call('ZRANGEBYSCORE', ARGV[2], '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])
local gone = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ev(id)) == 0 then
    redis.call('ZREM', ARGV[2], id)
    gone = gone + 1
  end
end
return gone
"""
)

# ARGV: prefix, queue, id, n, now, arq job bytes of attempt n + 1, attempt record of the replay.
# Sends a delivered or dead event again through the normal path (same id, so the same webhook-id):
# attempt n + 1 becomes due now, or waits held if its integration is paused or draining. The
# event's keys lose their retention expiry. Returns the new state, or false when the event is not
# delivered or dead (or attempt n is no longer its last).
REPLAY = (
    _PRELUDE
    + """
local queue, id, n, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
if (f[1] ~= 'delivered' and f[1] ~= 'dead') or f[2] ~= n then return false end
local integ = f[3]
local nn = tostring(tonumber(n) + 1)
redis.call('PERSIST', ev(id))
redis.call('PERSIST', rq(id))
redis.call('PERSIST', at(id))
redis.call('RPUSH', at(id), ARGV[7])
redis.call('ZREM', st(integ, f[1]), id)
local h = redis.call('HMGET', int(integ), 'state', 'draining')
if h[1] == 'paused' or h[2] or redis.call('ZCARD', st(integ, 'held')) > 0 then
  redis.call('HSET', ev(id), 's', 'held', 'n', nn, 'd', now)
  redis.call('ZADD', st(integ, 'held'), f[4], id)
  return 'held'
end
redis.call('HSET', ev(id), 's', 'pending', 'n', nn, 'd', now)
redis.call('ZADD', st(integ, 'pending'), f[4], id)
local jid = id .. ':' .. nn
redis.call('SET', job(jid), ARGV[6])
redis.call('ZADD', queue, now, jid)
return 'pending'
"""
)

# ARGV: prefix, integration, state (pending|retrying), offset, page size, received cutoff ms,
#       stale lock ms. Walks one page of that state index and returns, as a flat list of
#       id, n, due, the events whose arq job is gone, or is locked by arq's in-progress key with
#       less than `stale lock ms` left on it (a worker that took the job that long ago and never
#       claimed the attempt has died or lost Redis, and arq would keep it locked for the rest of the
#       job timeout + 10 s), and last the number of ids walked (fewer than a page: the end).
ORPHANS = (
    _PRELUDE
    + """
local offset, size = tonumber(ARGV[4]), tonumber(ARGV[5])
local cutoff, stale = tonumber(ARGV[6]), tonumber(ARGV[7])
local ids = redis.call('ZRANGE', st(ARGV[2], ARGV[3]), offset, offset + size - 1, 'WITHSCORES')
local out = {}
for k = 1, #ids, 2 do
  local id = ids[k]
  if tonumber(ids[k + 1]) <= cutoff then
    local f = redis.call('HMGET', ev(id), 'n', 'd')
    if f[1] then
      local jid = id .. ':' .. f[1]
      local lock = redis.call('PTTL', PROGRESS_PREFIX .. jid)
      if (lock == -2 and redis.call('EXISTS', job(jid)) == 0) or (lock >= 0 and lock < stale) then
        out[#out + 1] = id
        out[#out + 1] = f[1]
        out[#out + 1] = f[2]
      end
    end
  end
end
out[#out + 1] = #ids / 2
return out
"""
)

# ARGV: prefix, queue, id, n, due, arq job bytes, stale lock ms (as in ORPHANS).
# Re-creates the arq job of a due event when it is missing or its lock is stale; returns 1 when it
# did. Taking a stale lock is safe even if its worker is only slow: CLAIM is fenced, so at most one
# of the two runs of the job sends the attempt.
REENQUEUE = (
    _PRELUDE
    + """
local queue, id, n = ARGV[2], ARGV[3], ARGV[4]
local f = redis.call('HMGET', ev(id), 's', 'n')
if (f[1] ~= 'pending' and f[1] ~= 'retrying') or f[2] ~= n then return 0 end
local jid = id .. ':' .. n
local lock = redis.call('PTTL', PROGRESS_PREFIX .. jid)
if lock == -2 then
  if redis.call('EXISTS', job(jid)) == 1 then return 0 end
elseif lock < 0 or lock >= tonumber(ARGV[7]) then
  return 0
end
redis.call('DEL', RETRY_PREFIX .. jid, PROGRESS_PREFIX .. jid)
redis.call('SET', job(jid), ARGV[6])
redis.call('ZADD', queue, ARGV[5], jid)
return 1
"""
)
