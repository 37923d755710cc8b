-- Keeps a dead letter. KEYS: the dead letters, the count of those dropped,
-- where this entry's envelope is kept in parts (when it has any); ARGV:
-- --dead-max, the entry, the parts. The oldest go first (with their parts)
-- when there are too many. Returns how many were dropped.
for i = 3, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
local max = tonumber(ARGV[1])
local over = redis.call('RPUSH', KEYS[1], ARGV[2]) - max
if max > 0 and over > 0 then
  for _, old in ipairs(redis.call('LRANGE', KEYS[1], 0, over - 1)) do
    local ok, doc = pcall(cjson.decode, old)
    if ok and type(doc) == 'table' and type(doc.parts) == 'string' then
      redis.call('DEL', doc.parts)
    end
  end
  redis.call('LTRIM', KEYS[1], over, -1)
  redis.call('INCRBY', KEYS[2], over)
  return over
end
return 0
