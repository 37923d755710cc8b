-- members(key): a group's members, from a list (in order, repeats kept) or
-- a set; none if the key does not exist; nil and an error for another type.
local function members(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'list' then return redis.call('LRANGE', key, 0, -1) end
  if kind == 'set' then return redis.call('SMEMBERS', key) end
  if kind == 'none' then return {} end
  return nil, 'WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a list or a set'
end

-- each_member_once(key): members(key), each once, in the order first seen.
local function each_member_once(key)
  local found, err = members(key)
  if err then return nil, err end
  local uids, seen = {}, {}
  for _, uid in ipairs(found) do
    if not seen[uid] then
      seen[uid] = true
      uids[#uids + 1] = uid
    end
  end
  return uids
end
