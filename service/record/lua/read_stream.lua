-- The events after a stream id and the job's status, read together: when there are no new
-- events and the status is final, the stream has nothing more to send (the final event is
-- written atomically with the status). KEYS: events, job. ARGV: last id, count.
-- Returns [entries, status] as JSON.
local entries = redis.call('XREAD', 'COUNT', ARGV[2], 'STREAMS', KEYS[1], ARGV[1])
return cjson.encode({entries, redis.call('HGET', KEYS[2], 'status')})
