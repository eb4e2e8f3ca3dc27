-- Take the half-open trial lock, or keep it while our trial runs.
--
-- KEYS: trial (the lock: the owning process, with an expiry)
-- ARGV: process, lock ttl (ms), '1' while our trial is running
-- Returns 1 when this process owns the lock, else 0.
--
-- Extend only while the trial runs, so an idle owner lets another process try once the
-- lock lapses.
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  if ARGV[3] == '1' then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return 1
end
if owner then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
