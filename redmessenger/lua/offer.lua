-- A stopping node offers a storer partition it holds to whichever node
-- takes it first (acquire.lua): it goes on storing until then, so no
-- message falls between the two. KEYS: the partition's lease, its offer;
-- ARGV: node id, partition, the cluster channel. Returns whether it held it.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'O ' .. ARGV[2] .. ' ' .. ARGV[1])
return 1
