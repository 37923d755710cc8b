-- Puts a dead letter back in its user's queue, for `redmessenger dead retry`.
-- KEYS: the dead letters, the queue, the entry's parts; ARGV: the entry,
-- its envelope, ttl, max. Only an entry still there is pushed (a concurrent
-- retry does not push it twice), and only one that was pushed leaves.
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
local _, err = push(KEYS[2], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
if err then return redis.error_reply(err) end
redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('DEL', KEYS[3])
return 1
