-- Give every record of tenant `old` to tenant `new` (whose id replaced it; its objects have
-- moved from tenants/<old>/ to tenants/<new>/ already): tenant fields, storage paths in file and
-- checkpoint records, the tenant's own keys.
-- KEYS: old tenant's file index, old tenant's job index, old tenant's stream slots, served.
-- ARGV: JSON {old, new, file_pattern, job_pattern, checkpoints_pattern, renames: [[from, to]...]}.
-- Returns how many file and job records changed.
local a = cjson.decode(ARGV[1])
local old, new = a['old'], a['new']
local oldp, newp = 'tenants/' .. old .. '/', 'tenants/' .. new .. '/'
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local k = string.format(a['file_pattern'], id)
  local path = redis.call('HGET', k, 'path')
  if path then
    if string.sub(path, 1, #oldp) == oldp then path = newp .. string.sub(path, #oldp + 1) end
    redis.call('HSET', k, 'tenant', new, 'path', path)
    n = n + 1
  end
end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local k = string.format(a['job_pattern'], id)
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'tenant', new)
    n = n + 1
    local ckey = string.format(a['checkpoints_pattern'], id)
    local ck = redis.call('HGETALL', ckey)
    for i = 1, #ck, 2 do  -- ids are hex: no pattern characters in them
      local rec = string.gsub(ck[i + 1], '"path":"' .. oldp, '"path":"' .. newp)
      redis.call('HSET', ckey, ck[i], rec)
    end
  end
end
for _, pair in ipairs(a['renames']) do
  if redis.call('EXISTS', pair[1]) == 1 then redis.call('RENAME', pair[1], pair[2]) end
end
redis.call('DEL', KEYS[3])
local served = redis.call('HGET', KEYS[4], old)
if served then
  redis.call('HSET', KEYS[4], new, served)
  redis.call('HDEL', KEYS[4], old)
end
return n
