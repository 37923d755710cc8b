-- Renews a node's lease. KEYS: the lease, the set of nodes; ARGV: node id,
-- milliseconds, what the lease holds ("<host> <pid>"), then the leases of
-- the storer partitions the node holds. A lease that expired (Redis was
-- away, or this node stalled) comes back only if nothing was taken from
-- the node meanwhile: not reaped, every partition still its own. Returns
-- 1, or 0 when the node lost what it held and must start over.
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 1 then return 1 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
for i = 4, #ARGV do
  if redis.call('GET', ARGV[i]) ~= ARGV[1] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
return 1
