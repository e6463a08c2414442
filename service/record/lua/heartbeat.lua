-- Heartbeat of a worker process, timed by the Redis server's clock (no skew between hosts).
-- KEYS: workers. ARGV: worker id, ttl seconds.
local t = redis.call('TIME')
local s = tonumber(t[1])
redis.call('ZADD', KEYS[1], s, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', s - 10 * tonumber(ARGV[2]))
return s
