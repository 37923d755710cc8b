-- push(queue, envelope, ttl, max): append, keep the newest max (0: all)
-- and renew the queue's TTL (0: none). Returns how many old messages were
-- cut, or nil and Redis's error when the key is not a list.
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
