-- Record what a job's outputs (checkpoints, adapter, metrics) take in storage, measured by
-- the caller; the tenant's total moves by the difference, so measuring twice counts once.
-- KEYS: job, tenant output bytes. ARGV: bytes. Returns 0 when the job no longer exists.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local old = tonumber(redis.call('HGET', KEYS[1], 'output_bytes') or '0')
redis.call('HSET', KEYS[1], 'output_bytes', ARGV[1])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]) - old)
return 1
