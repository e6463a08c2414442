-- A page of a job's events, newest first, if the job is the caller's.
-- KEYS: job, events. ARGV: tenant, top of the range ('' = nothing is older), count.
-- Returns the entries as JSON, or false (nil) when the job is not the caller's.
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
if ARGV[2] == '' then return '[]' end
return cjson.encode(redis.call('XREVRANGE', KEYS[2], ARGV[2], '-', 'COUNT', ARGV[3]))
