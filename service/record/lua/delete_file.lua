-- Delete a file unless an unfinished job still uses it.
-- KEYS: file hash, tenant files, tenant bytes, file jobs, expiring. ARGV: id, counted ('1'/'0')
if redis.call('SCARD', KEYS[4]) > 0 then return redis.call('SRANDMEMBER', KEYS[4]) end
local b = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if ARGV[2] == '1' then redis.call('DECRBY', KEYS[3], b) end
return 1
