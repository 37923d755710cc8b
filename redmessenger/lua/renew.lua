-- Renews a node's lease, and what it says of itself. KEYS: the lease, the
-- set of nodes, the node's description; ARGV: node id, milliseconds, what
-- the lease holds ("<host> <pid>"), the description (JSON, for
-- `redmessenger status`), then the leases of the storer partitions the
-- node holds. A lease that expired (Redis was away, or this node stalled)
-- comes back only if nothing was taken from the node meanwhile: not
-- reaped, every partition still its own. Returns 1, or 0 when the node
-- lost what it held and must start over.
if redis.call('PEXPIRE', KEYS[1], ARGV[2]) == 0 then
  if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return 0 end
  for i = 5, #ARGV do
    if redis.call('GET', ARGV[i]) ~= ARGV[1] then return 0 end
  end
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
end
-- Refused while Redis is out of memory: the lease matters, this does not.
redis.pcall('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
return 1
