-- Create a job in validating_files, within the tenant's quota, if its files still exist.
-- KEYS: job, tenant jobs, tenant active, seq, stats, events, train file, train file jobs,
--       [valid file, valid file jobs]. ARGV[1]: JSON {job_id, tenant, limit, fields, message, now}
local a = cjson.decode(ARGV[1])
if redis.call('SCARD', KEYS[3]) >= tonumber(a['limit']) then return -1 end
for i = 7, #KEYS, 2 do
  if redis.call('HGET', KEYS[i], 'tenant') ~= a['tenant'] then return -2 end
end
for k, v in pairs(a['fields']) do redis.call('HSET', KEYS[1], k, v) end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), a['job_id'])
redis.call('SADD', KEYS[3], a['job_id'])
for i = 8, #KEYS, 2 do redis.call('SADD', KEYS[i], a['job_id']) end
redis.call('HINCRBY', KEYS[5], 'validating_files', 1)
redis.call('XADD', KEYS[6], '*', 'type', 'message', 'level', 'info', 'message', a['message'],
  'data', 'null', 'created_at', a['now'])
return 1
