-- Every socket of a node whose lease is gone leaves, as leave.lua would
-- have made it leave, and what it held in its users' claims goes back to
-- the head of their queues: the nodes that hold those users now are woken
-- to drain it at once, not at the users' next connect. KEYS: the node's set
-- of users, the set of present users, the node's lease, the set of nodes;
-- ARGV: the node's id, what comes before and after a user id in presence
-- keys, in presence channels, in queue keys, in claim sets and in claim
-- keys' heads; the leases' key prefix. Refused (-1) while the lease lives.
-- Returns how many sockets left.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local head, left = ARGV[1] .. ':', 0
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local presence, channel = ARGV[2] .. uid .. ARGV[3], ARGV[4] .. uid .. ARGV[5]
  for _, socket in ipairs(redis.call('ZRANGE', presence, 0, -1)) do
    if string.sub(socket, 1, #head) == head then
      redis.call('ZREM', presence, socket)
      redis.call('PUBLISH', channel, 'L ' .. socket)
      -- and gone (gone.lua): its node's stores are fenced now, so nothing
      -- it heard for the user can land after this point.
      redis.call('PUBLISH', channel, 'G ' .. socket)
      left = left + 1
    end
  end
  local back = recover(ARGV[6] .. uid .. ARGV[7], ARGV[8] .. uid .. ARGV[9], ARGV[12],
                       ARGV[10] .. uid .. ARGV[11])
  if redis.call('EXISTS', presence) == 0 then
    redis.call('SREM', KEYS[2], uid)
  elseif back > 0 then
    redis.call('PUBLISH', channel, 'W')
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
return left
