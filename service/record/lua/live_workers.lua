-- Workers whose last heartbeat is within the ttl, by the Redis server's clock.
-- KEYS: workers. ARGV: ttl seconds.
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], tonumber(t[1]) - tonumber(ARGV[1]), '+inf')
