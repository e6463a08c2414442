-- A page of a tenant's jobs, newest first, with the queue snapshot if one of them is queued
-- (prepended: queue_snapshot.lua). KEYS: the tenant's job index, queue, running, served.
-- ARGV: job pattern, tenant, `after` job id ('' none), where a previous call stopped ('' none),
-- how many jobs are still wanted, metadata filter (JSON or ''), tenant jobs pattern, how many
-- jobs to look at before returning (LIST_SCAN).
-- Returns [state, hashes, bound, snapshot or false] as JSON: state 0 = no more jobs, 1 = more jobs
-- than wanted, 2 = stopped after LIST_SCAN jobs (call again from `bound`), -1 = unknown `after`.
local job_pattern, tenant, want = ARGV[1], ARGV[2], tonumber(ARGV[5])
local bound = '+inf'
if ARGV[4] ~= '' then
  bound = ARGV[4]
elseif ARGV[3] ~= '' then
  local s = redis.call('ZSCORE', KEYS[1], ARGV[3])
  if not s then return cjson.encode({-1, {}, '', false}) end
  bound = '(' .. s
end
local meta = false
if ARGV[6] ~= '' then meta = cjson.decode(ARGV[6]) end
local out, queued, scanned = {}, false, 0
local function done(state)
  local snap = false
  if queued then snap = queue_snapshot(KEYS[2], KEYS[3], KEYS[4], job_pattern, ARGV[7]) end
  return cjson.encode({state, out, bound, snap})
end
while scanned < tonumber(ARGV[8]) do
  local batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], bound, '-inf', 'WITHSCORES', 'LIMIT', 0, 100)
  if #batch == 0 then return done(0) end
  for i = 1, #batch, 2 do
    scanned = scanned + 1
    local h = redis.call('HGETALL', string.format(job_pattern, batch[i]))
    local f = {}
    for k = 1, #h, 2 do f[h[k]] = h[k + 1] end
    local ok = f['tenant'] == tenant
    if ok and meta then
      local m = cjson.decode(f['spec'])['metadata']
      for k, v in pairs(meta) do
        if type(m) ~= 'table' or m[k] ~= v then ok = false end
      end
    end
    if ok then
      if #out == want then return done(1) end
      table.insert(out, h)
      if f['status'] == 'queued' then queued = true end
    end
    bound = '(' .. batch[i + 1]
  end
end
return done(2)
