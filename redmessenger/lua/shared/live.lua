-- live(sockets, leases): of a flat list of socket ids and their join
-- order (ZRANGE WITHSCORES), those whose node's lease (key leases ..
-- node, the id being '<node>:<n>') still exists.
local function live(sockets, leases)
  local found, alive = {}, {}
  for i = 1, #sockets, 2 do
    local node = string.match(sockets[i], '^(.-):')
    if alive[node] == nil then alive[node] = redis.call('EXISTS', leases .. node) == 1 end
    if alive[node] then
      found[#found + 1] = sockets[i]
      found[#found + 1] = sockets[i + 1]
    end
  end
  return found
end
