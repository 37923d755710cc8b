-- Every socket of a node whose lease is gone leaves, as leave.lua would
-- have made it leave. KEYS: the node's set of users, the set of present
-- users, the node's lease, the set of nodes; ARGV: the node's id, what
-- comes before and after a user id in presence keys and in presence
-- channels. Refused (-1) while the lease lives. Returns how many left.
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local head, left = ARGV[1] .. ':', 0
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local presence = ARGV[2] .. uid .. ARGV[3]
  for _, socket in ipairs(redis.call('ZRANGE', presence, 0, -1)) do
    if string.sub(socket, 1, #head) == head then
      redis.call('ZREM', presence, socket)
      redis.call('PUBLISH', ARGV[4] .. uid .. ARGV[5], 'L ' .. socket)
      left = left + 1
    end
  end
  if redis.call('EXISTS', presence) == 0 then redis.call('SREM', KEYS[2], uid) end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[4], ARGV[1])
return left
