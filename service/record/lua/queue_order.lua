-- The queue snapshot alone (prepended: queue_snapshot.lua).
-- KEYS: queue, running, served. ARGV: job pattern, tenant jobs pattern.
return queue_snapshot(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
