-- Forget a finished job's outputs: its checkpoint records, result files and merged model go in
-- one step, so nothing serves part of them while the caller deletes the objects. KEYS: job,
-- checkpoints, tenant files, then each result file's hash. ARGV: result file ids (JSON).
-- Returns the job's status, which must be final for anything to happen.
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return status or '' end
redis.call('DEL', KEYS[2])
for i, id in ipairs(cjson.decode(ARGV[1])) do
  redis.call('DEL', KEYS[3 + i])
  redis.call('ZREM', KEYS[3], id)
end
redis.call('HSET', KEYS[1], 'result_files', '[]', 'adapter_file', '')
redis.call('HDEL', KEYS[1], 'merged')
return status
