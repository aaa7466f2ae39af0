"""Every Redis key name and every Lua script of the gateway.

Layout under a prefix P (default "gw"):

    P:ev:{id}              hash   s=state n=attempt number (current or next) i=integration
                                  t=received ms d=due ms (or when it ended); small values only,
                                  so Redis keeps it as a listpack (a hash with a large field
                                  costs 400 bytes more per event)
    P:rq:{id}              string the request: JSON head (method, url, headers) + "\\n" + body
    P:at:{id}              list   one JSON record per finished attempt
    P:due:{integration}    zset   id -> due ms, for the integration's pending and retrying
                                  events: its schedule of deliveries
    P:ready                zset   integration -> the earliest ms it may have an attempt to claim
                                  (its next due event, its next rate token, or the end of a
                                  Retry-After wait); absent while it has nothing due or is at its
                                  `max_in_flight` (then `capped` is set in P:int); workers take
                                  what is due in batches (CLAIM_DUE), shared between integrations
    P:due                  zset   the one schedule of every integration that gateways before
                                  per-integration schedules kept; a worker that starts moves it
                                  (MIGRATE_DUE), so an upgrade loses no scheduled attempt
    P:bell                 list   rung (RPUSH) when a script moves a ready time earlier; an idle
                                  worker waits on it (BLPOP) until the earliest ready time
    P:lease                zset   id -> lease expiry ms, for in-flight events
    P:st:{integration}:{state}  zset  id -> received ms: the state index (the admin API reads it,
                                  and the reconciler walks the pending and retrying ones)
    P:idem:{integration}:{key}  string  first event id seen with that idempotency key
    P:int:{integration}    hash   the integration's health: state (active|paused), fails
                                  (consecutive failed attempts), w50/w90 (warnings sent this
                                  episode), last_error, last_failure_ms, last_success_ms,
                                  paused_ms, manual (paused by hand: no probes), probe_ms (next
                                  probe), cooldown_s, draining (set by a resume that leaves held
                                  events and by each drain batch; cleared when the drain finds
                                  nothing left to take); last_success_ms is written at most once
                                  a second; capped (at max_in_flight, out of P:ready until an
                                  attempt ends); tat (the rate limit's GCRA time, ms);
                                  wait_until / wait_reason (a Retry-After that holds every event);
                                  last_t (the received score ACCEPT gave its last event)
    P:drain:{integration}  string the lock of the one worker draining or probing it
    P:attention            set    integrations the drainer must look at: paused ones (to probe)
                                  and resumed ones with held events (to drain); the drainer
                                  forgets those that need neither
    P:replay:{id}          hash   a bulk replay: status, matched, replayed, skipped, created_ms, filter
    P:replay:{id}:ids      list   the ids it still has to replay (matched when it was asked for)
    P:replay:{id}:lock     string the lock of the one worker running it
    P:replays              set    the bulk replays still running
    P:workers              zset   worker id -> its last heartbeat (ms); live: within HEARTBEAT_TTL
    P:m:accepted           hash   metrics, cluster-wide: integration -> events accepted
    P:m:attempts           hash   integration|outcome -> finished attempts
    P:m:latency            hash   integration|bucket -> attempts (latency_sum: integration -> s)
    P:m:alerts             hash   kind -> alerts sent;  P:m:refused: reason -> inbound refused
    P:m:wait               hash   integration|bucket -> attempts by time from due to claim
                                  (wait_sum: integration -> s)
    P:mm:{minute}          hash   the dashboard's charts, per minute since the epoch (expires after
                                  two hours): integration|d{bucket} (attempts delivered) and
                                  integration|f{bucket} (attempts failed), by latency bucket (the
                                  index in LATENCY_BUCKETS); only attempts that called the endpoint
    P:replay-idem:{key}    string the bulk replay started with that Idempotency-Key
    P:px:{integration}:{hash}  string  proxy mode: the last good answer to one request (JSON head:
                                  status, headers, stored ms; "\n"; body), expiring after the
                                  integration's copy lifetime; {hash} is the request key
    P:pxi:{integration}    zset   request key -> expiry ms of its copy: the copies' index, pruned
                                  when copies are written and when they are counted
    P:pxs:{integration}    hash   request key -> bytes of its copy, and "#" -> their total; the
                                  oldest-expiring copies are evicted past `max_cache_bytes`
    P:probe:{integration}  string proxy mode: the last request that failed, which the probe sends
                                  while the integration is paused and holds no event
    P:m:proxy              hash   integration|cache -> proxy answers (miss, hit, stale)
    P:m:proxy_latency      hash   integration|bucket -> proxy answers (proxy_latency_sum: s)
    Arrival order: an event's received score (`t`, and its score in every state index) is the
    received ms, made larger by 1/1024 steps when needed to sort it after the events of its
    integration accepted before it in the same millisecond (ACCEPT, from `last_t`; several API
    processes and batches share a millisecond, and an id's random part must not order them). An
    ordered integration sends its oldest by that score first, and held events drain by it; TAKE_HELD
    keeps the held score in the in_flight index, so that an event put back (RETURN_HELD, FINISH)
    returns to its exact place. Only the admin API's `received_ms` drops the fraction.
    P:queue                the arq queue: the workers' periodic jobs (retention), never
                           events

Every state change is one of the scripts below, and each checks the event's state (and, where
it finishes an attempt, the attempt number: a fencing token) first, so a stale, repeated or late
call changes nothing. Terminal events carry no expiry: retention (TRIM) deletes them in batches,
which costs Redis less than three PEXPIREs per event on the delivery path.
"""

from __future__ import annotations

from dataclasses import dataclass

MINUTES_KEPT_S = 2 * 3600  # the dashboard charts the last hour; a minute's figures live two hours


@dataclass(frozen=True)
class Keys:
    prefix: str

    def event(self, event_id: str) -> str:
        return f"{self.prefix}:ev:{event_id}"

    def request(self, event_id: str) -> str:
        return f"{self.prefix}:rq:{event_id}"

    def attempts(self, event_id: str) -> str:
        return f"{self.prefix}:at:{event_id}"

    def due(self, integration: str) -> str:
        return f"{self.prefix}:due:{integration}"

    @property
    def legacy_due(self) -> str:
        """The one schedule of gateways before per-integration schedules (MIGRATE_DUE empties it)."""
        return f"{self.prefix}:due"

    @property
    def ready(self) -> str:
        return f"{self.prefix}:ready"

    @property
    def bell(self) -> str:
        return f"{self.prefix}:bell"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    def state_index(self, integration: str, state: str) -> str:
        return f"{self.prefix}:st:{integration}:{state}"

    def integration(self, name: str) -> str:
        return f"{self.prefix}:int:{name}"

    @property
    def attention(self) -> str:
        return f"{self.prefix}:attention"

    def drain_lock(self, name: str) -> str:
        return f"{self.prefix}:drain:{name}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def metric(self, name: str) -> str:
        return f"{self.prefix}:m:{name}"

    def minute(self, minute: str) -> str:
        return f"{self.prefix}:mm:{minute}"

    def replay(self, replay_id: str) -> str:
        return f"{self.prefix}:replay:{replay_id}"

    def replay_lock(self, replay_id: str) -> str:
        return f"{self.prefix}:replay:{replay_id}:lock"

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

    def proxy_copy(self, integration: str, request_key: str) -> str:
        return f"{self.prefix}:px:{integration}:{request_key}"

    def proxy_index(self, integration: str) -> str:
        return f"{self.prefix}:pxi:{integration}"

    def proxy_sizes(self, integration: str) -> str:
        return f"{self.prefix}:pxs:{integration}"

    def probe_request(self, integration: str) -> str:
        return f"{self.prefix}:probe:{integration}"


# The prelude's key functions (Lua name, Keys method, parameter names), and the fixed key names
# every script is given in KEYS, in this order (Lua name, Keys property; store.Script passes them).
_LUA_FUNCTIONS = [
    ("ev", "event", ("id",)),
    ("rq", "request", ("id",)),
    ("at", "attempts", ("id",)),
    ("st", "state_index", ("integ", "s")),
    ("int", "integration", ("name",)),
    ("due_key", "due", ("integ",)),
    ("idem_key", "idempotency", ("integ", "key")),
    ("px_key", "proxy_copy", ("integ", "key")),
    ("pxi_key", "proxy_index", ("integ",)),
    ("pxs_key", "proxy_sizes", ("integ",)),
    ("probe_key", "probe_request", ("integ",)),
    ("metric_key", "metric", ("name",)),
    ("minute_key", "minute", ("m",)),
]
LUA_NAMES = [
    ("READY", "ready"),
    ("BELL", "bell"),
    ("LEASE", "lease"),
    ("ATTENTION", "attention"),
    ("LEGACY_DUE", "legacy_due"),
]


def _lua_keys() -> str:
    """Lua for the prefix (ARGV[1]), the fixed key names (KEYS) and a function for each family of
    keys, from Keys: each method is called with markers in place of the prefix and its parameters,
    and the name it returns is cut at the markers into literals and Lua variables (`event` gives
    `return P .. ':ev:' .. id`)."""
    marked = Keys("\x00P\x00")

    def expression(name: str) -> str:
        parts = name.split("\x00")
        assert all("'" not in p and "\\" not in p for p in parts[::2])
        return " .. ".join(f"'{p}'" if i % 2 == 0 else p for i, p in enumerate(parts) if p)

    lines = ["local P = ARGV[1]"]
    for lua, method, params in _LUA_FUNCTIONS:
        name = getattr(marked, method)(*(f"\x00{p}\x00" for p in params))
        lines.append(f"local function {lua}({', '.join(params)}) return {expression(name)} end")
    lines += [f"local {lua} = KEYS[{k}]" for k, (lua, _) in enumerate(LUA_NAMES, 1)]
    return "\n".join(lines)


# Lua keeps the same layout, and does not write it again: the prelude's key functions and names
# are generated from Keys' own methods (called with markers for the prefix and the parts), so a
# key renamed in Keys is renamed in every script. The fixed names come in KEYS (as saq passes its
# keys); ARGV[1] is always the prefix, for the names built per event or integration inside a batch
# (they cannot be known before the script runs).
# Redis runs Lua 5.1 (no goto).
# Each command costs Redis 3-7 us per event here, so the hot scripts work on batches and use as
# few per event as the invariants allow: ACCEPT one, CLAIM_DUE two, FINISH_MANY three; the rest
# (index moves, metrics, health) is grouped into one command per batch and key.
_PRELUDE = (
    _lua_keys()
    + f"\nlocal MINUTES_KEPT_S = {MINUTES_KEPT_S}"
    + """
-- Many values in two arguments (redis-py packs each argument in Python, which cost more than the
-- script's work per event): `lengths` lists their byte lengths, comma-separated, and `data` holds
-- them back to back. Returns a function that gives the next value at each call.
local function fields(lengths, data)
  local lens, pos, li = {}, 1, 0
  for n in string.gmatch(lengths, '%d+') do lens[#lens + 1] = tonumber(n) end
  return function()
    li = li + 1
    local s = string.sub(data, pos, pos + lens[li] - 1)
    pos = pos + lens[li]
    return s
  end
end
-- Grouped writes: per key, a flat list of arguments, sent as one command at the end.
local function group(groups, key, a, b)
  local list = groups[key]
  if not list then
    list = {}
    groups[key] = list
  end
  list[#list + 1] = a
  if b ~= nil then list[#list + 1] = b end
end
local function flush(command, groups)
  for key, list in pairs(groups) do redis.call(command, key, unpack(list)) end
end
-- The schedule: each integration's due set (id -> due ms, pending and retrying events) and the
-- ready set (integration -> the earliest ms it may have an attempt to claim). `schedule` adds due
-- entries per integration (one ZADD each) and moves the integration's ready time earlier where
-- needed; `ring` then wakes a waiting worker, once per script, when any ready time moved earlier
-- (a worker waits until the earliest ready time, or for the bell).
local function schedule(dues)
  local earlier = false
  for integ, list in pairs(dues) do
    redis.call('ZADD', due_key(integ), unpack(list))
    local first = list[1]
    for j = 3, #list, 2 do if tonumber(list[j]) < tonumber(first) then first = list[j] end end
    if redis.call('ZADD', READY, 'LT', 'CH', first, integ) > 0 then earlier = true end
  end
  return earlier
end
local function ring()
  if redis.call('RPUSH', BELL, 1) > 16 then redis.call('LTRIM', BELL, -16, -1) end
end
-- An integration holds events while it is paused, and while it drains what it held (they wait
-- behind the held ones, so arrival order is kept). `draining` is set by a resume that leaves held
-- events and by each drain batch, and stays set until the drain finds nothing left to take (the
-- drain takes held events off the held index before it sends them, so an empty index alone does
-- not mean the drain is over). Events are held only while one of the two holds, so they cover a
-- non-empty held index too, and one read answers.
local function holds(integ)
  local f = redis.call('HMGET', int(integ), 'state', 'draining')
  return f[1] == 'paused' or f[2] ~= false
end
-- The score of the last held event (0 when none is held).
local function last_held(integ)
  local top = redis.call('ZREVRANGE', st(integ, 'held'), 0, 0, 'WITHSCORES')
  return tonumber(top[2] or 0)
end
-- The received score that sorts an event after every event of its integration accepted before
-- it: its received ms, or, when that would not (several in one millisecond), the last score +
-- 1/1024 (a step that a double keeps exactly below 2^43 ms, the year 2248; '%.17g' writes it back
-- exactly, and a whole ms as an integer). Ids sort by millisecond only, so a tie of scores would
-- order same-millisecond events at random. `last`: integration -> the last score given (from
-- `last_t`, or the last held score where that is later, then each call's). `now` is returned as
-- given where it serves (the usual case: no formatting per event); `now_n`: it as a number.
local function arrival_score(last, integ, now, now_n)
  local prev = last[integ]
  if prev < now_n then
    last[integ] = now_n
    return now
  end
  local score = prev + 1 / 1024
  last[integ] = score
  return string.format('%.17g', score)
end
-- Integration health over a batch of finished attempts: each integration's hash is read once
-- (health_load), every attempt counted in order (health_count), and the changes written once
-- (health_write). FINISH_MANY (the relay) and PROXIED (proxy mode) count alike.
local function health_load(H, integ)
  local h = H[integ]
  if h then return h end
  local f = redis.call('HMGET', int(integ), 'state', 'fails', 'w50', 'w90', 'last_success_ms', 'draining',
                       'capped')
  local fails = tonumber(f[2] or 0)
  h = {state = f[1] or 'active', fails = fails, fails0 = fails, set = {}, success = tonumber(f[5] or 0),
       draining = f[6] ~= false, capped = f[7] ~= false,
       w50 = f[3] ~= false, w90 = f[4] ~= false, had50 = f[3] ~= false, had90 = f[4] ~= false}
  H[integ] = h
  return h
end
-- code: "S" a success, "F" a failure that counts, "-" neither. r: {1, state, fails, paused, signals...}
-- gets the failure count, the pause flag and the signals (warn50, warn90, paused; once per episode).
local function health_count(h, now, code, threshold, last_error, cooldown, r)
  if code == 'S' then
    h.fails, h.w50, h.w90 = 0, false, false
    -- once a second is precise enough for an operator, and saves a write per batch
    if now - h.success >= 1000 then h.set.last_success_ms = now end
  elseif code == 'F' then
    h.fails = h.fails + 1
    r[3] = h.fails
    h.set.last_error, h.set.last_failure_ms = last_error, now
    threshold = tonumber(threshold)
    if h.fails * 2 >= threshold and not h.w50 then h.w50 = true; r[#r + 1] = 'warn50' end
    if h.fails * 10 >= threshold * 9 and not h.w90 then h.w90 = true; r[#r + 1] = 'warn90' end
    if h.fails >= threshold and h.state ~= 'paused' then
      cooldown = tonumber(cooldown)
      h.state = 'paused'
      h.set.state, h.set.paused_ms, h.set.manual = 'paused', now, 0
      h.set.cooldown_s, h.set.probe_ms = cooldown, now + cooldown * 1000
      r[#r + 1] = 'paused'
    end
  end
  if h.state == 'paused' then r[4] = 1 end
end
local function health_write(H)
  for integ, h in pairs(H) do
    local fields = {}
    if h.fails ~= h.fails0 then fields = {'fails', h.fails} end
    for name, value in pairs(h.set) do
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
    if h.w50 and not h.had50 then fields[#fields + 1] = 'w50'; fields[#fields + 1] = 1 end
    if h.w90 and not h.had90 then fields[#fields + 1] = 'w90'; fields[#fields + 1] = 1 end
    if #fields > 0 then redis.call('HSET', int(integ), unpack(fields)) end
    if h.set.state == 'paused' then redis.call('SADD', ATTENTION, integ) end
    local gone = {}
    if h.had50 and not h.w50 then gone[#gone + 1] = 'w50' end
    if h.had90 and not h.w90 then gone[#gone + 1] = 'w90' end
    if #gone > 0 then redis.call('HDEL', int(integ), unpack(gone)) end
  end
end
-- Proxy copies: forgets the expired ones, then (limit >= 0) evicts the soonest to expire until the
-- integration's copies fit in `limit` bytes.
local function prune_copies(integ, now, limit)
  local index, sizes = pxi_key(integ), pxs_key(integ)
  local function forget(keys)
    if #keys == 0 then return end
    local got = redis.call('HMGET', sizes, unpack(keys))
    local freed = 0
    for _, size in ipairs(got) do freed = freed + tonumber(size or 0) end
    redis.call('ZREM', index, unpack(keys))
    redis.call('HDEL', sizes, unpack(keys))
    redis.call('HINCRBY', sizes, '#', -freed)
  end
  forget(redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, 1000))
  if limit < 0 then return end
  local total = tonumber(redis.call('HGET', sizes, '#') or 0)
  while total > limit do
    local oldest = redis.call('ZRANGE', index, 0, 15)
    if #oldest == 0 then break end
    local doomed, freed = {}, {}
    local got = redis.call('HMGET', sizes, unpack(oldest))
    for j, key in ipairs(oldest) do
      if total <= limit then break end
      total = total - tonumber(got[j] or 0)
      freed[#freed + 1] = key
      doomed[#doomed + 1] = px_key(integ, key)
    end
    redis.call('UNLINK', unpack(doomed))
    forget(freed)
  end
end
-- Metric counters of a batch, added up per field and written with one command per field.
local function tally(counts, field, n)
  counts[field] = (counts[field] or 0) + (n or 1)
end
-- Returns true when an integer increment made a new field (it returned itself).
local function tally_write(key, counts, float)
  local new_field = false
  for field, n in pairs(counts) do
    if float then
      redis.call('HINCRBYFLOAT', key, field, string.format('%.6f', n))
    elseif redis.call('HINCRBY', key, field, n) == n then
      new_field = true
    end
  end
  return new_field
end
-- The dashboard's per-minute figures of a batch (see P:mm), in this minute's hash, kept two hours.
-- The expiry is set when a field is new (an increment that returns itself): always when the hash
-- is made, and not again on every batch (at low rates, batches of one, that was a command each).
local function per_minute(now, counts)
  if next(counts) == nil then return end
  local key = minute_key(string.format('%d', math.floor(now / 60000)))
  if tally_write(key, counts) then redis.call('EXPIRE', key, MINUTES_KEPT_S) end
end
-- An attempt that called the endpoint, counted for the charts: delivered or failed, by latency
-- bucket (one field, so one HINCRBY per batch and field).
local function tally_minute(minutes, integ, delivered, bucket)
  tally(minutes, integ .. (delivered and '|d' or '|f') .. bucket)
end
"""
)

# ARGV: prefix, now, idempotency ttl ms, count, lengths, data.
# `data` holds, per event, four fields back to back: id, integration, idempotency key (may be
# empty), request blob; `lengths` lists their byte lengths, comma-separated. (Two arguments
# instead of four per event: redis-py packs each argument in Python.)
# Returns per event: the id and 0 (new) or the first id and 1 (a repeat).
ACCEPT = (
    _PRELUDE
    + """
local now, idem_px, count = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now_n = tonumber(now)
local take = fields(ARGV[5], ARGV[6])
local out, seen, strings, due, indexed, holding, last, accepted = {}, {}, {}, {}, {}, {}, {}, {}
for k = 1, count do
  local id, integ, idem, blob = take(), take(), take(), take()
  local first = false
  if idem ~= '' then
    local ik = idem_key(integ, idem)
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
    if holding[integ] == nil then
      -- holds(integ) and the last score in one read
      local f = redis.call('HMGET', int(integ), 'state', 'draining', 'last_t')
      holding[integ] = f[1] == 'paused' or f[2] ~= false
      last[integ] = tonumber(f[3] or 0)
      if holding[integ] then last[integ] = math.max(last[integ], last_held(integ)) end
    end
    local t = arrival_score(last, integ, now, now_n)
    if holding[integ] then
      redis.call('HSET', ev(id), 's', 'held', 'n', '1', 'i', integ, 't', t, 'd', now)
      group(indexed, st(integ, 'held'), t, id)
    else
      redis.call('HSET', ev(id), 's', 'pending', 'n', '1', 'i', integ, 't', t, 'd', now)
      group(due, integ, now, id)
      group(indexed, st(integ, 'pending'), t, id)
    end
    out[#out + 1] = id
    out[#out + 1] = 0
  end
end
if #strings > 0 then redis.call('MSET', unpack(strings)) end
if schedule(due) then ring() end
flush('ZADD', indexed)
for integ, n in pairs(accepted) do
  redis.call('HINCRBY', metric_key('accepted'), integ, n)
  redis.call('HSET', int(integ), 'last_t', string.format('%.17g', last[integ]))
end
return out
"""
)

# ARGV: prefix, now, limit, policies (JSON object: integration -> [lease ms, max in flight, rate
# per s (0: none), burst, 1 if ordered]), the policy of any other integration (JSON list).
# Takes up to `limit` due attempts and moves each to in_flight under its integration's lease. The
# integrations whose ready time has come share the batch: each gets an equal share first (in the
# order they became ready), then what the others left; none gets more than its `max_in_flight`
# less what it has in flight (across all workers: the in_flight index), more than its rate allows
# (a GCRA bucket kept in its hash as `tat`), or anything while it waits for a Retry-After
# (`wait_until`). An ordered integration sends one attempt at a time, its oldest pending or
# retrying event first, once that one is due. An integration that reached its cap leaves the ready
# set and is marked `capped`; FINISH_MANY puts it back when one of its attempts ends. The due
# events of an integration that holds (paused, or draining) go to held instead, in arrival order.
# Returns the earliest ready time left (or 0 when none), then id, attempt, integration, received
# ms, request blob, due ms per event taken.
CLAIM_DUE = (
    _PRELUDE
    + """
local now, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local policies, default = cjson.decode(ARGV[4]), cjson.decode(ARGV[5])
local ready = READY
local names = redis.call('ZRANGEBYSCORE', ready, '-inf', now, 'LIMIT', 0, 64)
local out, blobs, removed, added, leased, claimed = {}, {}, {}, {}, {}, {}
local left = limit
-- Takes up to `want` due events of one integration; returns how many it took.
local function take(integ, want, pol)
  local key = due_key(integ)
  local h = redis.call('HMGET', int(integ), 'state', 'draining', 'wait_until', 'tat')
  local holding = h[1] == 'paused' or h[2] ~= false
  local wait_until = tonumber(h[3] or 0)
  if not holding and wait_until > now then
    redis.call('ZADD', ready, wait_until, integ)
    return 0
  end
  local ids
  local next_at = nil
  if holding then
    ids = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, left)
  else
    -- in flight across all workers, with what this call took (the index is written at the end)
    local busy = redis.call('ZCARD', st(integ, 'in_flight')) + (claimed[integ] or 0)
    local room = math.min(want, tonumber(pol[2]) - busy)
    if pol[5] == 1 then room = math.min(room, 1 - busy) end
    if room <= 0 then
      redis.call('HSET', int(integ), 'capped', 1)
      redis.call('ZREM', ready, integ)
      return 0
    end
    local rate, tat, interval, tolerance = tonumber(pol[3]), 0, 0, 0
    if rate > 0 then
      interval = 1000 / rate
      tolerance = (tonumber(pol[4]) - 1) * interval
      tat = math.max(tonumber(h[4] or 0), now)
      local tokens = math.floor((tolerance - (tat - now)) / interval) + 1
      if tokens <= 0 then
        redis.call('ZADD', ready, tat - tolerance, integ)
        return 0
      end
      room = math.min(room, tokens)
    end
    if pol[5] == 1 then
      -- the oldest pending or retrying event, by arrival, and only once it is due
      local a = redis.call('ZRANGE', st(integ, 'pending'), 0, 0, 'WITHSCORES')
      local b = redis.call('ZRANGE', st(integ, 'retrying'), 0, 0, 'WITHSCORES')
      local head = a[1]
      if b[1] and (not a[1] or tonumber(b[2]) < tonumber(a[2]) or (b[2] == a[2] and b[1] < a[1])) then
        head = b[1]
      end
      local due = head and redis.call('ZSCORE', key, head)
      if not due then
        redis.call('ZREM', ready, integ)
        return 0
      end
      if tonumber(due) > now then
        redis.call('ZADD', ready, due, integ)
        return 0
      end
      ids = {head}
      redis.call('ZREM', key, head)
    else
      ids = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, room)
      if #ids > 0 then redis.call('ZREMRANGEBYRANK', key, 0, #ids - 1) end
    end
    if rate > 0 and #ids > 0 then
      tat = tat + #ids * interval
      redis.call('HSET', int(integ), 'tat', string.format('%.3f', tat))
      if #ids == room then next_at = tat - tolerance end
    end
  end
  if holding and #ids > 0 then redis.call('ZREMRANGEBYRANK', key, 0, #ids - 1) end
  local taken = 0
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't', 'd')
    local s = f[1]
    if s == 'pending' or s == 'retrying' then
      group(removed, st(integ, s), id)
      if holding then
        redis.call('HSET', ev(id), 's', 'held')
        group(added, st(integ, 'held'), f[4], id)
      else
        redis.call('HSET', ev(id), 's', 'in_flight')
        group(added, st(integ, 'in_flight'), f[4], id)
        leased[#leased + 1] = now + tonumber(pol[1])
        leased[#leased + 1] = id
        blobs[#blobs + 1] = rq(id)
        out[#out + 1] = id
        out[#out + 1] = f[2]
        out[#out + 1] = integ
        out[#out + 1] = f[4]
        out[#out + 1] = f[5]
        taken = taken + 1
      end
    end
  end
  claimed[integ] = (claimed[integ] or 0) + taken
  -- the integration's next ready time: its next due event, or its next token
  if pol[5] ~= 1 or holding then
    local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #head == 0 then
      redis.call('ZREM', ready, integ)
    else
      redis.call('ZADD', ready, math.max(tonumber(head[2]), next_at or 0), integ)
    end
  elseif taken > 0 then
    redis.call('HSET', int(integ), 'capped', 1)
    redis.call('ZREM', ready, integ)
  end
  return taken
end
-- An equal share each first, then what the others left, to those that had more.
local hungry = {}
if #names > 0 then
  local share = math.max(1, math.ceil(limit / #names))
  for _, integ in ipairs(names) do
    if left <= 0 then break end
    local want = math.min(share, left)
    local got = take(integ, want, policies[integ] or default)
    left = left - got
    if got == want then hungry[#hungry + 1] = integ end
  end
  for _, integ in ipairs(hungry) do
    if left <= 0 then break end
    left = left - take(integ, left, policies[integ] or default)
  end
end
flush('ZREM', removed)
flush('ZADD', added)
local with = {}
local first = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
with[1] = first[2] or 0
if #blobs > 0 then
  redis.call('ZADD', LEASE, unpack(leased))
  local got = redis.call('MGET', unpack(blobs))
  for k = 1, #blobs do
    for j = 1, 5 do with[#with + 1] = out[(k - 1) * 5 + j] end
    with[#with + 1] = got[k]
  end
end
return with
"""
)

# ARGV: prefix, now, items (JSON list), then one attempt record (JSON) per item.
# An item: [id, n, outcome (delivered|dead|retrying), due ms of a retry, "1" when only an expired
#   lease may be finished (the reconciler), health ("S" a success, "F" a failure that counts, "-"
#   neither: a lost worker), failure threshold, last error, first probe cool-down s, where a retry
#   waits ("retrying": scheduled; "held": a drained event keeps its place), latency bucket index
#   ("" when nothing was sent), latency s, bucket index of the time from due to claim ("" none),
#   that time in s, ms until which the endpoint asked the whole integration to wait (429/503 with
#   Retry-After; "0": no such ask), and why].
# Finishes attempts in order, each as FINISH of one would: records the attempt, moves the event on,
# counts the integration's consecutive failures and pauses it at the threshold; a retry of a paused
# integration is held instead of scheduled. The integration's health is read once per integration
# and written once at the end. Returns per item 0 when attempt n is no longer the one in flight
# (nothing changed for it), else {1, final state, consecutive failures, 1 if the integration is now
# paused, signals...}, the signals being warn50, warn90 and paused (each once per episode).
FINISH_MANY = (
    _PRELUDE
    + """
local now = tonumber(ARGV[2])
local items = cjson.decode(ARGV[3])
local health, out = {}, {}
local leases, removed, added, due, attempts, latency, latency_sum = {}, {}, {}, {}, {}, {}, {}
local waited, waited_sum, minutes = {}, {}, {}
for k, item in ipairs(items) do
  local id, n, outcome = item[1], item[2], item[3]
  local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
  local live = f[1] == 'in_flight' and f[2] == n
  if live and item[5] == '1' then
    local lease = redis.call('ZSCORE', LEASE, id)
    live = not lease or tonumber(lease) <= now
  end
  if not live then
    out[k] = 0
  else
    local integ = f[3]
    local h = health_load(health, integ)
    local r = {1, outcome, 0, 0}
    health_count(h, now, item[6], item[7], item[8], item[9], r)
    -- Held instead of scheduled: a drained event that failed, any retry while paused, and an
    -- attempt lost with its worker while the integration drains (a drained one goes back to its
    -- exact place; the others would be held when they came due anyway).
    local lost_in_drain = item[5] == '1' and h.draining
    if outcome == 'retrying' and (item[10] == 'held' or h.state == 'paused' or lost_in_drain) then
      outcome = 'held'
      r[2] = outcome
    end
    tally(attempts, integ .. '|' .. outcome)
    if item[11] ~= '' then
      tally(latency, integ .. '|' .. item[11])
      tally(latency_sum, integ, tonumber(item[12]))
      tally_minute(minutes, integ, outcome == 'delivered', item[11])
    end
    if item[13] ~= '' then
      tally(waited, integ .. '|' .. item[13])
      tally(waited_sum, integ, tonumber(item[14]))
    end
    local hold_until = tonumber(item[15])
    if hold_until > now then
      -- the endpoint asked for time (429/503 with Retry-After): the whole integration waits
      h.set.wait_until, h.set.wait_reason = hold_until, item[16]
      h.wait_until = math.max(h.wait_until or 0, hold_until)
    end
    local record = ARGV[3 + k]
    if outcome == 'held' and item[3] ~= 'held' then
      -- written for a retry: the record says what became of the event, as the metrics count it
      -- (a pattern with bare quotes cannot match inside a JSON string, where they are escaped)
      record = string.gsub(record, '"outcome":"retrying"', '"outcome":"held"', 1)
      record = string.gsub(record, ',"retry_in_s":[^,}]*', '', 1)
    end
    redis.call('RPUSH', at(id), record)
    leases[#leases + 1] = id
    local score = f[4]
    if outcome == 'held' then
      -- back to its place: TAKE_HELD kept its held score (finer than the received ms) in in_flight
      score = redis.call('ZSCORE', st(integ, 'in_flight'), id) or f[4]
    end
    group(removed, st(integ, 'in_flight'), id)
    group(added, st(integ, outcome), score, id)
    local nn = tostring(tonumber(n) + 1)
    if outcome == 'retrying' then
      redis.call('HSET', ev(id), 's', 'retrying', 'n', nn, 'd', item[4])
      group(due, integ, item[4], id)
    elseif outcome == 'held' then
      redis.call('HSET', ev(id), 's', 'held', 'n', nn, 'd', now)
    else
      redis.call('HSET', ev(id), 's', outcome, 'd', now)
    end
    out[k] = r
  end
end
if #leases > 0 then redis.call('ZREM', LEASE, unpack(leases)) end
flush('ZREM', removed)
flush('ZADD', added)
local earlier = schedule(due)
for integ, h in pairs(health) do
  if h.wait_until then
    redis.call('ZADD', READY, h.wait_until, integ)
  elseif h.capped then
    -- a slot of an integration at its cap is free again
    redis.call('HDEL', int(integ), 'capped')
    if redis.call('ZADD', READY, 'LT', 'CH', now, integ) > 0 then earlier = true end
  end
end
if earlier then ring() end
health_write(health)
tally_write(metric_key('wait'), waited)
tally_write(metric_key('wait_sum'), waited_sum, true)
tally_write(metric_key('attempts'), attempts)
tally_write(metric_key('latency'), latency)
tally_write(metric_key('latency_sum'), latency_sum, true)
per_minute(now, minutes)
return out
"""
)

# ARGV: prefix, now, items (JSON list), lengths, data: per item three values (see `fields`), the
# request blob, the attempt record (JSON), and the upstream's answer to keep as the request's last
# good copy ("" for none).
# An item: [id, integration, state (delivered|dead: answered and done; retrying: a queued write),
#   attempt number of the event (the next one when queued), due ms of a queued write, health code
#   ("S", "F" or "-"), failure threshold, last error, first probe cool-down s, latency bucket index
#   of the upstream call ("" when none was made), its latency s, how the answer was served (miss,
#   hit, stale), answer latency bucket index, answer latency s, request key of the copy, copy
#   lifetime ms, max bytes of the integration's copies].
# The log of proxy mode: each proxied request becomes an event that is already answered (or, for a
# write that failed and is queued, retrying like a relay event, or held while its integration
# holds), with its one attempt; the upstream call counts towards the integration's health exactly
# as FINISH_MANY counts; a 2xx answer is kept as the request's copy; the copies over the byte bound
# are evicted, soonest to expire first; the last failed request is kept for the probe.
# Returns per item {1, state, consecutive failures, 1 if paused, signals...}.
PROXIED = (
    _PRELUDE
    + """
local now = tonumber(ARGV[2])
local items = cjson.decode(ARGV[3])
local health, out, strings, added, due, last = {}, {}, {}, {}, {}, {}
local attempts, latency, latency_sum, answers, answer_latency, answer_sum = {}, {}, {}, {}, {}, {}
local copied, minutes = {}, {}
local take = fields(ARGV[4], ARGV[5])
for k, item in ipairs(items) do
  local id, integ, state = item[1], item[2], item[3]
  local blob, record, copy = take(), take(), take()
  local h = health_load(health, integ)
  local r = {1, state, 0, 0}
  health_count(h, now, item[6], item[7], item[8], item[9], r)
  local score = now
  if state == 'retrying' and (h.state == 'paused' or h.draining) then
    state = 'held'
    r[2] = state
    if last[integ] == nil then last[integ] = last_held(integ) end
    score = arrival_score(last, integ, now, now)
  end
  if state == 'retrying' then
    redis.call('HSET', ev(id), 's', state, 'n', item[4], 'i', integ, 't', now, 'd', item[5])
    group(due, integ, item[5], id)
  else
    redis.call('HSET', ev(id), 's', state, 'n', item[4], 'i', integ, 't', now, 'd', now)
  end
  strings[#strings + 1] = rq(id)
  strings[#strings + 1] = blob
  redis.call('RPUSH', at(id), record)
  group(added, st(integ, state), score, id)
  if item[6] == 'F' then redis.call('SET', probe_key(integ), blob) end
  if item[10] ~= '' then
    tally(attempts, integ .. '|' .. state)
    tally(latency, integ .. '|' .. item[10])
    tally(latency_sum, integ, tonumber(item[11]))
    tally_minute(minutes, integ, state == 'delivered', item[10])
  end
  tally(answers, integ .. '|' .. item[12])
  tally(answer_latency, integ .. '|' .. item[13])
  tally(answer_sum, integ, tonumber(item[14]))
  if copy ~= '' then
    local key, ttl = item[15], tonumber(item[16])
    local sizes = pxs_key(integ)
    redis.call('SET', px_key(integ, key), copy, 'PX', ttl)
    redis.call('ZADD', pxi_key(integ), now + ttl, key)
    local before = tonumber(redis.call('HGET', sizes, key) or 0)
    redis.call('HSET', sizes, key, #copy)
    redis.call('HINCRBY', sizes, '#', #copy - before)
    copied[integ] = tonumber(item[17])
  end
  out[k] = r
end
if #strings > 0 then redis.call('MSET', unpack(strings)) end
flush('ZADD', added)
if schedule(due) then ring() end
health_write(health)
tally_write(metric_key('attempts'), attempts)
tally_write(metric_key('latency'), latency)
tally_write(metric_key('latency_sum'), latency_sum, true)
tally_write(metric_key('proxy'), answers)
tally_write(metric_key('proxy_latency'), answer_latency)
tally_write(metric_key('proxy_latency_sum'), answer_sum, true)
per_minute(now, minutes)
for integ, limit in pairs(copied) do prune_copies(integ, now, limit) end
return out
"""
)

# ARGV: prefix, then per request: integration, request key ("" for none). What proxy mode reads
# before it calls the endpoint, for the requests of many callers at once: per request, 1 if the
# integration is paused (else 0), and the request's copy ("" when there is none or none was asked).
PROXY_VIEW = (
    _PRELUDE
    + """
local out, states = {}, {}
for k = 2, #ARGV, 2 do
  local integ, key = ARGV[k], ARGV[k + 1]
  if states[integ] == nil then states[integ] = redis.call('HGET', int(integ), 'state') == 'paused' end
  out[#out + 1] = states[integ] and 1 or 0
  out[#out + 1] = key ~= '' and redis.call('GET', px_key(integ, key)) or ''
end
return out
"""
)

# ARGV: prefix, now, then integration names. Prunes each integration's index of expired copies and
# returns per integration {copies, bytes}.
COPIES = (
    _PRELUDE
    + """
local now, out = tonumber(ARGV[2]), {}
for k = 3, #ARGV do
  local integ = ARGV[k]
  prune_copies(integ, now, -1)
  local sizes = pxs_key(integ)
  out[#out + 1] = {redis.call('ZCARD', pxi_key(integ)), tonumber(redis.call('HGET', sizes, '#') or 0)}
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
    redis.call('ZADD', LEASE, now + lease, id)
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
    redis.call('SREM', ATTENTION, integ)
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
    redis.call('ZREM', LEASE, id)
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
# held events then drain, oldest first (the integration is `draining` until they are all sent).
SET_STATE = (
    _PRELUDE
    + """
local integ, now = ARGV[2], ARGV[3]
local ik = int(integ)
local before = redis.call('HGET', ik, 'state') or 'active'
local held = redis.call('ZCARD', st(integ, 'held'))
if ARGV[4] == 'pause' then
  if before ~= 'paused' or ARGV[5] == '1' then
    redis.call('HSET', ik, 'state', 'paused', 'paused_ms', now, 'manual', ARGV[5])
  end
  redis.call('SADD', ATTENTION, integ)
else
  redis.call('HSET', ik, 'state', 'active', 'fails', 0)
  redis.call('HDEL', ik, 'w50', 'w90', 'manual', 'probe_ms', 'cooldown_s', 'paused_ms')
  -- new events keep waiting behind the held ones until the drain has taken them all
  if held > 0 then
    redis.call('HSET', ik, 'draining', 1)
    redis.call('SADD', ATTENTION, integ)
  end
end
return {before, held}
"""
)

# ARGV: prefix, index key, state, cutoff ms, limit. Retention: deletes the events of a delivered or
# dead index that ended before the cutoff (their record, request and attempts), with their index
# entries. Entries are walked by received ms, a lower bound of when the event ended; one received
# before the cutoff but ended after it (replayed since) stays for a later pass. Returns how many
# went.
TRIM = (
    _PRELUDE
    + """
local key, state, cutoff = ARGV[2], ARGV[3], tonumber(ARGV[4])
local ids = redis.call('ZRANGEBYSCORE', key, '-inf', cutoff, 'LIMIT', 0, ARGV[5])
local gone, doomed = {}, {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', ev(id), 's', 'd')
  if f[1] ~= state then
    gone[#gone + 1] = id  -- a stale entry: the event moved on, or is gone
  elseif tonumber(f[2]) <= cutoff then
    gone[#gone + 1] = id
    doomed[#doomed + 1] = ev(id)
    doomed[#doomed + 1] = rq(id)
    doomed[#doomed + 1] = at(id)
  end
end
if #doomed > 0 then redis.call('UNLINK', unpack(doomed)) end
if #gone > 0 then redis.call('ZREM', key, unpack(gone)) end
return #gone
"""
)

# ARGV: prefix, id, n, now, attempt record of the replay.
# Sends a delivered or dead event again through the normal path (same id, so the same webhook-id):
# attempt n + 1 becomes due now, or waits held if its integration is paused or draining. Returns
# the new state, or false when the event is not delivered or dead (or attempt n is no longer its
# last).
REPLAY = (
    _PRELUDE
    + """
local id, n, now = ARGV[2], ARGV[3], ARGV[4]
local f = redis.call('HMGET', ev(id), 's', 'n', 'i', 't')
if (f[1] ~= 'delivered' and f[1] ~= 'dead') or f[2] ~= n then return false end
local integ = f[3]
local nn = tostring(tonumber(n) + 1)
redis.call('RPUSH', at(id), ARGV[5])
redis.call('ZREM', st(integ, f[1]), id)
if holds(integ) then
  redis.call('HSET', ev(id), 's', 'held', 'n', nn, 'd', now)
  redis.call('ZADD', st(integ, 'held'), f[4], id)
  return 'held'
end
redis.call('HSET', ev(id), 's', 'pending', 'n', nn, 'd', now)
redis.call('ZADD', st(integ, 'pending'), f[4], id)
if schedule({[integ] = {now, id}}) then ring() end
return 'pending'
"""
)

# ARGV: prefix. The integrations in P:attention with what the drainer decides on: per
# integration {name, state, manual, probe ms, "1" if draining}; those that are neither paused nor
# draining leave the set (a resume whose drain ended, or a resume with nothing held).
ATTENTION = (
    _PRELUDE
    + """
local out = {}
for _, integ in ipairs(redis.call('SMEMBERS', ATTENTION)) do
  local f = redis.call('HMGET', int(integ), 'state', 'manual', 'probe_ms', 'draining')
  if f[1] ~= 'paused' and not f[4] then
    redis.call('SREM', ATTENTION, integ)
  else
    out[#out + 1] = {integ, f[1] or 'active', f[2] or '0', f[3] or '0', f[4] and '1' or '0'}
  end
end
return out
"""
)

# ARGV: prefix. Moves a schedule written by a gateway before per-integration schedules (one zset
# P:due of id -> due ms for every integration) into P:due:{integration} and P:ready, so that an
# upgrade loses no scheduled attempt. Entries whose event is gone are dropped. Returns how many
# moved.
MIGRATE_DUE = (
    _PRELUDE
    + """
local old = LEGACY_DUE
if redis.call('TYPE', old).ok ~= 'zset' then return 0 end
local moved = 0
while true do
  local batch = redis.call('ZRANGE', old, 0, 999, 'WITHSCORES')
  if #batch == 0 then break end
  local dues = {}
  for k = 1, #batch, 2 do
    local integ = redis.call('HGET', ev(batch[k]), 'i')
    if integ then
      group(dues, integ, batch[k + 1], batch[k])
      moved = moved + 1
    end
  end
  schedule(dues)
  redis.call('ZREMRANGEBYRANK', old, 0, #batch / 2 - 1)
end
if moved > 0 then ring() end
return moved
"""
)

# KEYS[1]: a lock; ARGV[1]: its owner. Deletes the lock only if that owner still holds it (a lock
# that expired may already belong to another worker). Returns 1 when it did.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
