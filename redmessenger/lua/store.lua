-- Stores many messages in one call. KEYS: the node's lease, then every
-- recipient queue, message after message; ARGV: ttl, max, then per message
-- the number of its keys and the envelope. A key Redis refuses (not a list) does not stop the
-- others. A refusal of every write (OOM, READONLY) comes at the first push,
-- before anything is written (a script may only be refused a write until
-- it has made one): the whole call is then refused, to be sent again as it
-- is. Returns {cuts, failed}: key index and count of messages cut (over
-- max), key index and error of each refused key.
-- A node whose lease is gone is refused: it counts as dead, and another
-- node may have decided for these messages.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('FENCED this node\'s lease expired')
end
local ttl, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local cuts, failed, k, written = {}, {}, 2, false
for i = 3, #ARGV, 2 do
  for j = k, k + tonumber(ARGV[i]) - 1 do
    local cut, err = push(KEYS[j], ARGV[i + 1], ttl, max)
    if err and not written and not string.find(err, 'WRONGTYPE', 1, true) then
      return redis.error_reply(err)
    end
    written = written or not err
    if err then
      failed[#failed + 1] = j
      failed[#failed + 1] = err
    elseif cut > 0 then
      cuts[#cuts + 1] = j
      cuts[#cuts + 1] = cut
    end
  end
  k = k + tonumber(ARGV[i])
end
return {cuts, failed}
