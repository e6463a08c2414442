-- Register a file; counted files (uploads) must fit the tenant's byte quota. A file with an
-- expiry (expires_at > 0) is indexed for the sweep in the same step.
-- KEYS: file hash, tenant files, tenant bytes, seq, expiring.
-- ARGV[1]: JSON {id, fields, bytes, counted, limit, expires_at}
local a = cjson.decode(ARGV[1])
if a['counted'] then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + a['bytes'] > a['limit'] then return -1 end
  redis.call('INCRBY', KEYS[3], a['bytes'])
end
local existed = redis.call('EXISTS', KEYS[1])
for k, v in pairs(a['fields']) do redis.call('HSET', KEYS[1], k, v) end
if existed == 0 then redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), a['id']) end
if a['expires_at'] > 0 then redis.call('ZADD', KEYS[5], a['expires_at'], a['id']) end
return 1
