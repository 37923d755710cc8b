-- members(key): a group's members, from a list (in order, repeats kept) or
-- a set; none if the key does not exist; nil and an error for another type.
local function members(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then return redis.call('LRANGE', key, 0, -1) end
  if kind == 'set' then return redis.call('SMEMBERS', key) end
  if kind == 'none' then return {} end
  return nil, 'WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a list or a set'
end
