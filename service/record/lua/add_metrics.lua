-- A metrics event, dropped when its step is not newer than the last one recorded (a
-- resumed job re-runs steps after its checkpoint; the first report of a step wins) or
-- when the caller no longer owns the job.
-- KEYS: events, metrics_step, job. ARGV: step, created_at, message, data, owner, peak bytes
if redis.call('HGET', KEYS[3], 'worker') ~= ARGV[5] then return false end
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[1]) <= last then return false end
redis.call('SET', KEYS[2], ARGV[1])
local peak = tonumber(ARGV[6])
if peak > tonumber(redis.call('HGET', KEYS[3], 'peak_memory_bytes') or '0') then
  redis.call('HSET', KEYS[3], 'peak_memory_bytes', ARGV[6])
end
return redis.call('XADD', KEYS[1], '*', 'type', 'metrics', 'level', 'info', 'message', ARGV[3],
  'data', ARGV[4], 'created_at', ARGV[2])
