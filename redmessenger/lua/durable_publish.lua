-- Stores a message for its recipients and wakes those online, who drain
-- it, atomically. KEYS[1]: the user's queue, or the group's members (a list
-- or a set). ARGV: channel, payload, envelope, 'users' or 'groups', what
-- comes before and after a uid in its queue's key, ttl, max, the user or
-- group id, what comes before and after a uid in presence keys and in
-- presence channels. Returns how many nodes were woken, the queues it was
-- stored in, and how many old messages each had to drop (max).
-- Stored first, then a wake: a RedMessenger that dies at any moment loses
-- nothing of it, and one that is not running finds it when its user comes.
-- Every queue's type is checked before the first is written: a group
-- message is stored for all of its members or for none (a retry after a
-- half-done store would give the first members a second copy, new id).
local uids = {ARGV[9]}
if ARGV[4] ~= 'users' then
  local err
  uids, err = each_member_once(KEYS[1])
  if err then return redis.error_reply(err) end
end
local queues = {}
for i, uid in ipairs(uids) do
  queues[i] = ARGV[5] .. uid .. ARGV[6]
  local kind = redis.call('TYPE', queues[i])['ok']
  if kind ~= 'list' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. queues[i] .. ' is a ' .. kind ..
                             ', not a list: the message was stored for nobody')
  end
end
local affixes = {ARGV[5], ARGV[6], ARGV[10], ARGV[11], ARGV[12], ARGV[13]}
local ttl, max, cuts, woken = tonumber(ARGV[7]), tonumber(ARGV[8]), {}, 0
for _, uid in ipairs(uids) do
  local cut, err, heard = deliver(uid, ARGV[3], ttl, max, affixes)
  if err then return redis.error_reply(err) end
  cuts[#cuts + 1] = cut
  woken = woken + heard
end
return {woken, queues, cuts}
