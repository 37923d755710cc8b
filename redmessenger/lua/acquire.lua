-- A node takes a storer partition that nobody holds, whose holder's lease
-- is gone, or that its holder offers (it is stopping). KEYS: the
-- partition's lease, the node's lease, the set of present users, the
-- partition's offer; ARGV: node id, partition, number of partitions, the
-- holders' lease key prefix, what comes before and after a user id in
-- presence keys, the node's channel, the cluster channel. The node hears,
-- on its own channel, how it took it and every socket of the partition's
-- present users as of this moment (JSON; those of nodes whose lease is gone
-- are as good as gone), and then everyone hears the new holder: it decides
-- for the partition's messages from that point of the stream on. Returns
-- 0 when a live node holds the partition, 2 when it was offered (the giver
-- stores until it hears the taker, then says it is done: 'D'), else 1.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.error_reply('FENCED this node\'s lease expired')
end
local holder, taken = redis.call('GET', KEYS[1]), 1
if holder and holder ~= ARGV[1] and redis.call('EXISTS', ARGV[4] .. holder) == 1 then
  if redis.call('GET', KEYS[4]) ~= holder then return 0 end
  taken = 2
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[4])
local k, n, users = tonumber(ARGV[2]), tonumber(ARGV[3]), {}
for _, uid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if string.byte(uid, -1) % n == k then
    users[uid] = live(redis.call('ZRANGE', ARGV[5] .. uid .. ARGV[6], 0, -1, 'WITHSCORES'),
                      ARGV[4])
  end
end
redis.call('PUBLISH', ARGV[7], 'S ' .. ARGV[2] .. ' ' .. taken .. ' ' .. cjson.encode(users))
redis.call('PUBLISH', ARGV[8], 'E ' .. ARGV[2] .. ' ' .. ARGV[1])
return taken
