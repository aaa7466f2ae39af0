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
ACCEPT = _PRELUDE + """
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
local out, seen, strings, queued, indexed = {}, {}, {}, {}, {}
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
    redis.call('HSET', ev(id), 's', 'pending', 'n', '1', 'i', integ, 't', now, 'd', now)
    local jid = id .. ':1'
    strings[#strings + 1] = rq(id)
    strings[#strings + 1] = blob
    strings[#strings + 1] = job(jid)
    strings[#strings + 1] = jobdata
    queued[#queued + 1] = now
    queued[#queued + 1] = jid
    local index = indexed[integ]
    if not index then
      index = {}
      indexed[integ] = index
    end
    index[#index + 1] = now
    index[#index + 1] = id
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
if #strings > 0 then
  redis.call('MSET', unpack(strings))
  redis.call('ZADD', queue, unpack(queued))
  for integ, index in pairs(indexed) do redis.call('ZADD', st(integ, 'pending'), unpack(index)) end
end
return out
"""

# ARGV: prefix, id, n, now, lease ms. Moves a due event to in_flight when attempt n is the
# current one; returns {integration, received ms, request blob}, or nil for a stale job.
CLAIM = _PRELUDE + """
local id, n, now, lease = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
local s = f[1]
if (s ~= 'pending' and s ~= 'retrying') or f[2] ~= n then return false end
redis.call('HSET', ev(id), 's', 'in_flight')
redis.call('ZADD', P .. ':lease', now + lease, id)
redis.call('ZREM', st(f[3], s), id)
redis.call('ZADD', st(f[3], 'in_flight'), f[4], id)
return {f[3], f[4], redis.call('GET', rq(id))}
"""

# ARGV: prefix, queue, id, n, now, outcome (delivered|dead|retrying), attempt record,
#       due ms, arq job bytes, retention ms of a terminal event,
#       "1" when only an expired lease may be finished (the reconciler).
# Returns 1, or 0 when attempt n is no longer the one in flight (nothing is changed).
FINISH = _PRELUDE + """
local queue, id, n, now, outcome = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
if f[1] ~= 'in_flight' or f[2] ~= n then return 0 end
if ARGV[11] == '1' then
  local lease = redis.call('ZSCORE', P .. ':lease', id)
  if lease and tonumber(lease) > now then return 0 end
end
redis.call('RPUSH', at(id), ARGV[7])
redis.call('ZREM', P .. ':lease', id)
redis.call('ZREM', st(f[3], 'in_flight'), id)
redis.call('ZADD', st(f[3], outcome), f[4], id)
if outcome == 'retrying' then
  local due = ARGV[8]
  local nn = tostring(tonumber(n) + 1)
  redis.call('HSET', ev(id), 's', 'retrying', 'n', nn, 'd', due)
  local jid = id .. ':' .. nn
  redis.call('SET', job(jid), ARGV[9])
  redis.call('ZADD', queue, due, jid)
else
  redis.call('HSET', ev(id), 's', outcome, 'd', now)
  redis.call('PEXPIRE', ev(id), ARGV[10])
  redis.call('PEXPIRE', rq(id), ARGV[10])
  redis.call('PEXPIRE', at(id), ARGV[10])
end
return 1
"""

# ARGV: prefix, integration, state (pending|retrying), offset, page size, received cutoff ms,
#       stale lock ms. Walks one page of that state index and returns, as a flat list of
#       id, n, due, the events whose arq job is gone, or is locked by arq's in-progress key with
#       less than `stale lock ms` left on it (a worker that took the job that long ago and never
#       claimed the attempt has died or lost Redis, and arq would keep it locked for the rest of the
#       job timeout + 10 s), and last the number of ids walked (fewer than a page: the end).
ORPHANS = _PRELUDE + """
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

# ARGV: prefix, queue, id, n, due, arq job bytes, stale lock ms (as in ORPHANS).
# Re-creates the arq job of a due event when it is missing or its lock is stale; returns 1 when it
# did. Taking a stale lock is safe even if its worker is only slow: CLAIM is fenced, so at most one
# of the two runs of the job sends the attempt.
REENQUEUE = _PRELUDE + """
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
