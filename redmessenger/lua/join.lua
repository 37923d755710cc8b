-- A socket joins its user, cluster-wide. KEYS: the user's presence (a zset
-- of socket ids scored by join order), the set of present users, the
-- node's set of users, the join counter, the node's lease, the user's
-- leaving sockets; ARGV: socket id, user id, the user's presence channel,
-- --max-sockets-per-user, the leases' key prefix.
-- The PUBLISH puts the join at one point of every subscriber's stream, with
-- what it needs to know there: the socket's place in join order, the socket
-- it pushed out (past the limit; '-' for none) and every socket of the user
-- after it, with theirs (not those of nodes whose lease is gone: as good as
-- gone, until they are reaped). A node whose lease is gone is refused: it
-- counts as dead, and what it held may have been taken over.
if redis.call('EXISTS', KEYS[5]) == 0 then
  return redis.error_reply('FENCED this node\'s lease expired')
end
local seq = redis.call('INCR', KEYS[4])
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
local evicted, max = '-', tonumber(ARGV[4])
if max > 0 and redis.call('ZCARD', KEYS[1]) > max then
  evicted = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  redis.call('ZREM', KEYS[1], evicted)
end
local all = live(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), ARGV[5])
redis.call('PUBLISH', ARGV[3], 'J ' .. ARGV[1] .. ' ' .. seq .. ' ' .. evicted .. ' ' ..
           table.concat(all, ' '))
-- The sockets that left and whose nodes may still store what they heard
-- for the user before that (those of live nodes): the joining node drains
-- once each is gone (G).
local leaving = {}
for _, socket in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  if redis.call('EXISTS', ARGV[5] .. string.match(socket, '^(.-):')) == 1 then
    leaving[#leaving + 1] = socket
  end
end
return {seq, leaving}
