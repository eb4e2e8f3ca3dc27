-- Close the shared breaker after a successful trial, and tell every process.
--
-- KEYS: breaker, trial (the half-open trial lock), channel (pub/sub)
-- ARGV: process, the breaker value of the opening its trial answers for,
--       'SPUBLISH' on a Redis Cluster (sharded pub/sub), else 'PUBLISH'
-- Returns 1 when closed, 0 when that opening is no longer the one on record.
--
-- Close only the opening this process's trial answers for: after an outage another
-- process may have opened the breaker anew, and a stale "closed" must not close everyone's.
-- No opening on record (Redis restarted) closes nothing either: the renewals close the
-- others once nobody tells Redis of an opening.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
local news = 'closed 0 ' .. ARGV[1]
-- A server without sharded pub/sub (before Redis 7) publishes to the whole cluster.
local sent = ARGV[3] == 'SPUBLISH' and redis.pcall('SPUBLISH', KEYS[3], news)
if type(sent) ~= 'number' then redis.call('PUBLISH', KEYS[3], news) end
return 1
