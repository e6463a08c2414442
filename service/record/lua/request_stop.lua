-- Ask a running job to stop (cancel) or to pause; the worker sees the flag at its next
-- optimizer step (a pause also writes a checkpoint). KEYS: job, events. ARGV: the flag's
-- field (cancel_requested, pause_requested), message, now. Returns the current status.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then return status or '' end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= '1' then
  redis.call('HSET', KEYS[1], ARGV[1], '1')
  redis.call('XADD', KEYS[2], '*', 'type', 'message', 'level', 'info', 'message', ARGV[2],
    'data', 'null', 'created_at', ARGV[3])
end
return status
