-- Publishes, and stores the message if nobody heard it. KEYS[1]: the
-- user's queue, or the group's members (a list or a set). ARGV: channel,
-- payload, envelope, 'users' or 'groups', what comes before and after a
-- uid in its queue's key, ttl, max. Returns the subscribers that heard it,
-- and if none did, the queues it was stored in and how many old messages
-- each had to drop (max).
-- Scripts may PUBLISH: doing both in one script leaves no moment in which a
-- RedMessenger could subscribe between the two and miss the message.
-- Every queue's type is checked before the first is written: a group
-- message is stored for all of its members or for none (a retry after a
-- half-done store would give the first members a second copy, new id).
local heard = redis.call('PUBLISH', ARGV[1], ARGV[2])
if heard > 0 then return {heard, {}, {}} end
local queues = {}
if ARGV[4] == 'users' then
  queues[1] = KEYS[1]
else
  local uids, err = members(KEYS[1])
  if err then return redis.error_reply(err) end
  local seen = {}
  for _, uid in ipairs(uids) do
    if not seen[uid] then
      seen[uid] = true
      queues[#queues + 1] = ARGV[5] .. uid .. ARGV[6]
    end
  end
end
for _, queue in ipairs(queues) do
  local kind = redis.call('TYPE', queue)['ok']
  if kind ~= 'list' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. queue .. ' is a ' .. kind ..
                             ', not a list: the message was stored for nobody')
  end
end
local ttl, max, cuts = tonumber(ARGV[7]), tonumber(ARGV[8]), {}
for _, queue in ipairs(queues) do
  local cut, err = push(queue, ARGV[3], ttl, max)
  if err then return redis.error_reply(err) end
  cuts[#cuts + 1] = cut
end
return {0, queues, cuts}
