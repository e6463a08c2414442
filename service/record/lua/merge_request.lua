-- Ask for a succeeded job's merged model (base weights with the adapter merged in), whose state
-- is the job's `merged` field (JSON; service/record/store/merges.py). A ready one is served; a
-- failed one is reported once and forgotten, so the request after it builds again; a build
-- younger than the abandon age is waited for; otherwise a new build is recorded here, so two
-- requests racing start one build.
-- KEYS: job. ARGV: now, seconds after which an unfinished build counts as abandoned, a token
-- for a new build. Returns {job status, merged state JSON or '', 'build' | 'no_adapter' | ''}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', '', ''} end
if status ~= 'succeeded' then return {status, '', ''} end
if (redis.call('HGET', KEYS[1], 'adapter_file') or '') == '' then return {status, '', 'no_adapter'} end
local raw = redis.call('HGET', KEYS[1], 'merged')
if raw then
  local m = cjson.decode(raw)
  if m.status == 'ready' then return {status, raw, ''} end
  if m.status == 'failed' then
    redis.call('HDEL', KEYS[1], 'merged')
    return {status, raw, ''}
  end
  if tonumber(ARGV[1]) - tonumber(m.since) < tonumber(ARGV[2]) then return {status, raw, ''} end
end
local new = cjson.encode({status = 'building', since = tonumber(ARGV[1]), token = ARGV[3]})
redis.call('HSET', KEYS[1], 'merged', new)
return {status, new, 'build'}
