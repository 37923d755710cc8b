-- A socket leaves its user. KEYS: the user's presence, the set of present
-- users, the user's leaving sockets; ARGV: socket id, user id, the user's
-- presence channel. A socket already gone (pushed out past the limit, or
-- reaped with its dead node) leaves no second time: no event. A socket
-- that left stays among the leaving until its node has stored what it
-- heard for the user before this point (gone.lua): a node joining the user
-- meanwhile waits for that before it drains. Returns whether it left.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[2]) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], 60)
redis.call('PUBLISH', ARGV[3], 'L ' .. ARGV[1])
return 1
