-- What the fair order is computed from, read in one step: every queued job with its tenant
-- and its age (score in the tenant's job index), the tenant of every running job, and when
-- each tenant was last served. Job hashes are read by the ids found (a single Redis, as
-- everywhere here). A Lua function, prepended to the scripts that need it, so that the API's
-- reads (`service.record.reads`) take the same snapshot in the script that reads a job.
-- queue, running, served: keys; job_pattern, tenant_jobs_pattern: `redis_keys.lua_pattern`s.
-- Returns {{id, tenant, seq}...}, {tenant...}, served.
local function queue_snapshot(queue, running, served, job_pattern, tenant_jobs_pattern)
  local queued = {}
  for _, id in ipairs(redis.call('ZRANGE', queue, 0, -1)) do
    local t = redis.call('HGET', string.format(job_pattern, id), 'tenant')
    if t then
      local seq = redis.call('ZSCORE', string.format(tenant_jobs_pattern, t), id)
      table.insert(queued, {id, t, seq or '0'})
    end
  end
  local running_tenants = {}
  for _, id in ipairs(redis.call('SMEMBERS', running)) do
    local t = redis.call('HGET', string.format(job_pattern, id), 'tenant')
    if t then table.insert(running_tenants, t) end
  end
  return {queued, running_tenants, redis.call('HGETALL', served)}
end
