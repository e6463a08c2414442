-- Generic guarded transition of a job's state machine.
-- KEYS: job, queue, running, lease, tenant active, events, stats, seq, then the job's files' job sets.
-- ARGV[1] is a JSON object: job_id, from (list), to, owner (required current owner or ""), new_owner,
--   lease_ms, require_no_lease (bool), unless_set (flag field or ""), set (field -> string),
--   incr (field -> int), event (or null), now.
-- Returns {1, old_status} when applied, {0, current_status or ""} when refused.
local a = cjson.decode(ARGV[1])
local job, queue, running, lease, active, events, stats, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local status = redis.call('HGET', job, 'status')
if not status then return {0, ''} end
local ok = false
for _, s in ipairs(a['from']) do if s == status then ok = true end end
if not ok then return {0, status} end
-- the state machine itself: no caller can ask for an edge outside it
local EDGES = {validating_files = {queued = 1, failed = 1, cancelled = 1, paused = 1},
               queued = {running = 1, failed = 1, cancelled = 1, paused = 1},
               running = {succeeded = 1, failed = 1, cancelled = 1, queued = 1, paused = 1},
               paused = {queued = 1, cancelled = 1}}
if not EDGES[status] or not EDGES[status][a['to']] then return {0, status} end
if status == 'running' and a['to'] == 'queued' and not a['require_no_lease'] then return {0, status} end
-- a running job pauses only through the worker that owns it (or the reaper, once it is gone)
if status == 'running' and a['to'] == 'paused' and a['owner'] == '' and not a['require_no_lease'] then
  return {0, status}
end
if a['owner'] ~= '' and redis.call('HGET', job, 'worker') ~= a['owner'] then return {0, status} end
if a['require_no_lease'] and redis.call('EXISTS', lease) == 1 then return {0, status} end
if a['unless_set'] ~= '' and redis.call('HGET', job, a['unless_set']) == '1' then return {0, status} end
local to = a['to']
redis.call('HSET', job, 'status', to)
for k, v in pairs(a['set']) do redis.call('HSET', job, k, v) end
for k, v in pairs(a['incr']) do redis.call('HINCRBY', job, k, v) end
if to == 'queued' then
  redis.call('ZADD', queue, redis.call('INCR', seq), a['job_id'])
else
  redis.call('ZREM', queue, a['job_id'])
end
if to == 'running' then
  redis.call('SADD', running, a['job_id'])
  redis.call('HSET', job, 'worker', a['new_owner'])
  redis.call('SET', lease, a['new_owner'], 'PX', a['lease_ms'])
else
  redis.call('SREM', running, a['job_id'])
  redis.call('DEL', lease)
  if status == 'running' then redis.call('HDEL', job, 'worker') end
end
if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
  redis.call('SREM', active, a['job_id'])
  for i = 9, #KEYS do redis.call('SREM', KEYS[i], a['job_id']) end
end
redis.call('HINCRBY', stats, status, -1)
redis.call('HINCRBY', stats, to, 1)
local e = a['event']
if type(e) == 'table' then
  redis.call('XADD', events, '*', 'type', 'message', 'level', e['level'], 'message', e['message'],
    'data', e['data'], 'created_at', a['now'])
end
return {1, status}
