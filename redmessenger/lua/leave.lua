-- A socket leaves its user. KEYS: the user's presence, the set of present
-- users; ARGV: socket id, user id, the user's presence channel. A socket
-- already gone (pushed out past the limit, or reaped with its dead node)
-- leaves no second time: no event. Returns whether it left.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], 'L ' .. ARGV[1])
return 1
