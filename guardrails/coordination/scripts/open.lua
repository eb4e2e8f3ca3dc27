-- Record an opening of the shared breaker and tell every process at once.
--
-- KEYS: breaker, trial (the half-open trial lock), channel (pub/sub)
-- ARGV: open period (ms), linger (ms), process, '1' to re-tell an old opening,
--       'SPUBLISH' on a Redis Cluster (sharded pub/sub), else 'PUBLISH'
-- Returns the breaker value written, or false when an old opening was not re-told.
--
-- The breaker key holds "<end of open period, Redis ms>:<opener>"; it outlives the period
-- (a trial still has to succeed) and is deleted when a trial closes the breaker. ARGV[4]
-- '1' re-tells an old opening Redis lost: it must not replace a newer one written since.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local remaining, linger = tonumber(ARGV[1]), tonumber(ARGV[2])
local value = (now + remaining) .. ':' .. ARGV[3]
if ARGV[4] == '1' then
  if redis.call('GET', KEYS[1]) then return false end
end
redis.call('SET', KEYS[1], value, 'PX', remaining + linger)
redis.call('DEL', KEYS[2])
local news = 'open ' .. remaining .. ' ' .. ARGV[3] .. ' ' .. value
-- A server without sharded pub/sub (before Redis 7) publishes to the whole cluster.
local sent = ARGV[5] == 'SPUBLISH' and redis.pcall('SPUBLISH', KEYS[3], news)
if type(sent) ~= 'number' then redis.call('PUBLISH', KEYS[3], news) end
return value
