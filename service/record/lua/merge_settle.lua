-- Record how a merge build ended (ready or failed), or forget it, if it is still the build the
-- job waits for: one abandoned and started again, or whose job's outputs were deleted
-- meanwhile (which drops the `merged` field), is not, and its caller removes what it wrote.
-- KEYS: job. ARGV: the build's token, the new state JSON ('' forgets the state).
-- Returns 1 when recorded.
local raw = redis.call('HGET', KEYS[1], 'merged')
if not raw then return 0 end
local m = cjson.decode(raw)
if m.token ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'merged')
else
  if m.status ~= 'building' then return 0 end
  redis.call('HSET', KEYS[1], 'merged', ARGV[2])
end
return 1
