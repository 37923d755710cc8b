-- recover(queue, claims, heartbeats, claim_head): the claims listed in the
-- set claims whose process has no heartbeat left (key heartbeats .. owner)
-- go back to the head of queue, in the order they were taken: what a
-- process killed mid-drain held. A claim's key is claim_head followed by
-- '<owner>:<number>', the owner in hex. Returns how many messages came back.
local function recover(queue, claims, heartbeats, claim_head)
  local dead = {}
  for _, claim in ipairs(redis.call('SMEMBERS', claims)) do
    local owner, n = string.match(string.sub(claim, #claim_head + 1), '^(%x+):(%d+)$')
    if owner and redis.call('EXISTS', heartbeats .. owner) == 0 then
      dead[#dead + 1] = {owner, tonumber(n), claim}
    end
  end
  table.sort(dead, function(a, b)
    if a[1] ~= b[1] then return a[1] > b[1] end
    return a[2] > b[2]
  end)
  local recovered = 0
  for _, d in ipairs(dead) do
    local items = redis.call('LRANGE', d[3], 0, -1)
    for i = #items, 1, -1 do redis.call('LPUSH', queue, items[i]) end
    recovered = recovered + #items
    redis.call('DEL', d[3])
    redis.call('SREM', claims, d[3])
  end
  return recovered
end
