-- Remove a finished job that has no outputs left: its record, events and index entries.
-- KEYS: job, events, metrics step, checkpoints, tenant jobs, stats. ARGV: job id.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return status or '' end
if tonumber(redis.call('HGET', KEYS[1], 'output_bytes') or '0') ~= 0 then return 'has_outputs' end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HINCRBY', KEYS[6], status, -1)
return 'deleted'
