-- One job, and the queue snapshot when it is queued (its position needs it; prepended: queue_snapshot.lua).
-- KEYS: job, queue, running, served. ARGV: job pattern, tenant jobs pattern.
-- Returns [hash] or [hash, snapshot] as JSON; [{}] when there is no such job.
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  if h[i] == 'status' and h[i + 1] == 'queued' then return cjson.encode({h, queue_snapshot(KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2])}) end
end
return cjson.encode({h})
