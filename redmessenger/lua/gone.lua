-- A node has stored what it heard for a user before its socket left: the
-- socket is no longer among the leaving. KEYS: the user's leaving sockets;
-- ARGV: socket id, the user's presence channel. Run after the node's stores,
-- on the same connection. Returns whether it was there.
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[2], 'G ' .. ARGV[1])
return 1
