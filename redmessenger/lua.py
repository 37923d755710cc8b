"""Lua that RedMessenger's scripts and durable_publish()'s script share, so
that a group's members are read, and a message is queued, by one rule
whichever of them does it. Each is prepended to the scripts that call it."""

# members(key): a group's members, from a list (in order, repeats kept) or
# a set; none if the key does not exist; nil and an error for another type.
MEMBERS = """
local function members(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then return redis.call('LRANGE', key, 0, -1) end
  if kind == 'set' then return redis.call('SMEMBERS', key) end
  if kind == 'none' then return {} end
  return nil, 'WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a list or a set'
end
"""

# push(queue, envelope, ttl, max): append, keep the newest ``max`` (0: all)
# and renew the queue's TTL (0: none). Returns how many old messages were
# cut, or nil and Redis's error when the key is not a list.
PUSH = """
local function push(queue, envelope, ttl, max)
  local length = redis.pcall('RPUSH', queue, envelope)
  if type(length) == 'table' and length.err then return nil, length.err end
  local cut = 0
  if max > 0 and length > max then
    cut = length - max
    redis.call('LTRIM', queue, cut, -1)
  end
  if ttl > 0 then redis.call('EXPIRE', queue, ttl) end
  return cut
end
"""
