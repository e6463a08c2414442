-- A job and its checkpoint records. KEYS: job, checkpoints.
-- Returns [hash, [checkpoint JSON...]] as JSON.
return cjson.encode({redis.call('HGETALL', KEYS[1]), redis.call('HVALS', KEYS[2])})
