-- A stopping node gives up a storer partition nobody took from its offer,
-- if it still holds it. KEYS: the partition's lease, its offer; ARGV: node
-- id, partition, the cluster channel. Returns whether it held it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[3], 'R ' .. ARGV[2] .. ' ' .. ARGV[1])
return 1
