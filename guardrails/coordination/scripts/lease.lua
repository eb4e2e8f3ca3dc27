-- Renew one process's lease on the shared budget, in one call: drop expired leases,
-- grant from what the others leave, record the lease, and report the shared breaker.
--
-- KEYS: leases (zset: process -> expiry), held (hash: process -> slots on record),
--       wants (hash: process -> slots it needs), breaker (string, see open.lua)
-- ARGV: process, want, need, floor, budget, ttl (ms)
-- Returns {grant, record, active, fair, contended, breaker ms left or -1, breaker value}
--
-- Times are Redis's own (TIME), so process clocks never matter. ``need`` is what a
-- process used lately, ``want`` adds spare slots. While some process needs more than it
-- holds, nobody is granted more than it needs nor more than ceil(budget / processes that
-- need slots): spare slots go back to where the work is, and idle processes (need 0)
-- neither hold them nor shrink the others' fair share.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, want, need = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local floor, budget, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, m in ipairs(expired) do
  redis.call('HDEL', KEYS[2], m)
  redis.call('HDEL', KEYS[3], m)
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local held = redis.call('HGETALL', KEYS[2])
local others, active, contended = 0, 0, 0
if need > 0 then active = 1 end
for i = 1, #held, 2 do
  local m = held[i]
  if m ~= me then
    local h = tonumber(held[i + 1])
    others = others + h
    local n = tonumber(redis.call('HGET', KEYS[3], m) or h)
    if n > 0 then active = active + 1 end
    if n > h then contended = 1 end
  end
end
local fair = math.ceil(budget / math.max(active, 1))
local grant = math.min(want, budget - others)
if contended == 1 then grant = math.min(grant, fair, need) end
if grant < 0 then grant = 0 end
local record = math.max(grant, floor)
if record == 0 and want == 0 then
  redis.call('ZREM', KEYS[1], me)
  redis.call('HDEL', KEYS[2], me)
  redis.call('HDEL', KEYS[3], me)
else
  redis.call('ZADD', KEYS[1], now + ttl, me)
  redis.call('HSET', KEYS[2], me, record)
  redis.call('HSET', KEYS[3], me, need)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], 2 * ttl) end
end
local remaining = -1
local b = redis.call('GET', KEYS[4])
if b then
  local until_ms = tonumber(string.match(b, '^(%d+)'))
  remaining = math.max(0, until_ms - now)
end
return {grant, record, active, fair, contended, remaining, b or ''}
