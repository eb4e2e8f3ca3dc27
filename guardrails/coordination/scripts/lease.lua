-- Renew one process's lease on the shared budget, in one call: notice a Redis that lost
-- its records, drop expired leases, grant from what the others leave, record this
-- process's lease, and report the shared breaker.
--
-- KEYS: leases (zset: process -> expiry), held (hash: process -> slots on record),
--       wants (hash: process -> slots it needs), breaker (string, see open.lua),
--       generation (string: "<server run_id>:<settling until>:<last call>"),
--       channel (pub/sub), asked (string: a request for slots was published lately)
-- ARGV: process, want, need, floor, budget, lease ttl (ms), claim, this lease (ms),
--       'SPUBLISH' on a Redis Cluster (sharded pub/sub), else 'PUBLISH'
-- Returns {grant, record, active, fair, contended, breaker ms left or -1, breaker value,
--          settling ms left (0 when not settling), generation}
--
-- Times are Redis's own (TIME), so process clocks never matter. ``need`` is what a
-- process used lately, ``want`` adds spare slots. While some process needs more than it
-- holds, nobody is granted more than it needs nor more than ceil(budget / processes that
-- need slots): spare slots go back to where the work is, and idle processes (need 0)
-- neither hold them nor shrink the others' fair share. A process left short while others
-- hold more than they may keep publishes "need <fair share> <process>" (at most once a
-- third of a ttl): they renew at once and give the excess back, instead of at their
-- next scheduled renewal.
--
-- A generation is one server's unbroken memory of the leases. A missing generation key
-- (Redis restarted empty, flushed, or forgot the keys) or another server's run_id (a
-- failover, or a restart that reloaded an older copy) starts a new one: Redis no longer
-- knows what the processes run, and they still run it. For one lease ttl it settles:
-- nobody is granted more than it already may use (``claim``, its limit now). Every live
-- process renews within that time and puts its use on record again, and every lease
-- the old records knew of has run out, so grants resume on a full count.
-- A call after a silence of over half a ttl (Redis stalled, or unreachable for all)
-- keeps the leases that ran out meanwhile one ttl more: their processes could not renew.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, want, need = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local floor, budget, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local claim, lease = tonumber(ARGV[7]), tonumber(ARGV[8])
local keep = 86400000 -- ms the keys outlive the last call: a day, then a budget is forgotten

local server = ''
local info = redis.pcall('INFO', 'server')
if type(info) == 'string' then server = string.match(info, 'run_id:(%w+)') or '' end
local settle_until, last
local gen = redis.call('GET', KEYS[5])
if gen then
  local s, u, l = string.match(gen, '^(%w*):(%d+):(%d+)$')
  if s == server then settle_until, last = tonumber(u), tonumber(l) end
end
if not settle_until then
  settle_until = now + ttl
  -- Leases another server recorded may be stale: none outlives the settling.
  local late = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. settle_until, '+inf')
  for _, m in ipairs(late) do redis.call('ZADD', KEYS[1], settle_until, m) end
elseif now - last > ttl / 2 then
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. last, now)
  for _, m in ipairs(lapsed) do redis.call('ZADD', KEYS[1], now + ttl, m) end
end
local settling = math.max(0, settle_until - now)

local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(expired) do
  redis.call('HDEL', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local held = redis.call('HGETALL', KEYS[2])
local others, active, contended = 0, 0, 0
local most = 0 -- the most any other process holds beyond what it needs
if need > 0 then active = 1 end
for i = 1, #held, 2 do
  local m = held[i]
  if m ~= me then
    local h = tonumber(held[i + 1])
    others = others + h
    local n = tonumber(redis.call('HGET', KEYS[3], m) or h)
    if n > 0 then active = active + 1 end
    if n > h then contended = 1 end
    most = math.max(most, h - math.min(n, h))
  end
end
local fair = math.ceil(budget / math.max(active, 1))
local grant = math.min(want, budget - others)
if settling > 0 then
  grant = math.min(grant, claim)
elseif contended == 1 then
  grant = math.min(grant, fair, need)
end
if grant < 0 then grant = 0 end
local record = math.max(grant, floor)
if record == 0 and want == 0 then
  redis.call('ZREM', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
  redis.call('HDEL', KEYS[3], me)
else
  redis.call('ZADD', KEYS[1], now + lease, me)
  redis.call('HSET', KEYS[2], me, record)
  redis.call('HSET', KEYS[3], me, need)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], keep) end
end
redis.call('SET', KEYS[5], server .. ':' .. settle_until .. ':' .. now, 'PX', keep)
if settling == 0 and need > record and (most > 0 or others > budget - fair) then
  if redis.call('SET', KEYS[7], me, 'NX', 'PX', math.max(1, math.floor(ttl / 3))) then
    local news = 'need ' .. fair .. ' ' .. me
    local sent = ARGV[9] == 'SPUBLISH' and redis.pcall('SPUBLISH', KEYS[6], news)
    if type(sent) ~= 'number' then redis.call('PUBLISH', KEYS[6], news) end
  end
end
local remaining = -1
local b = redis.call('GET', KEYS[4])
if b then
  local until_ms = tonumber(string.match(b, '^(%d+)'))
  remaining = math.max(0, until_ms - now)
end
return {grant, record, active, fair, contended, remaining, b or '', settling,
        server .. ':' .. settle_until}
