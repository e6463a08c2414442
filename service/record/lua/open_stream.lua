-- A job and its events after a stream id, read together. KEYS: job, events. ARGV: last id, count.
-- Returns [hash, entries] as JSON.
local h = redis.call('HGETALL', KEYS[1])
return cjson.encode({h, redis.call('XREAD', 'COUNT', ARGV[2], 'STREAMS', KEYS[2], ARGV[1])})
