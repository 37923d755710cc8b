-- deliver(uid, envelope, ttl, max, a): store the envelope in the user's
-- queue, and wake whichever node holds a socket of the user: it drains the
-- queue. Nothing is ever only in flight, so no node's death can lose it.
-- a: what comes before and after a uid in queue keys, presence keys and
-- presence channels. Returns how many old messages were cut (max), or nil
-- and Redis's error; and how many nodes heard the wake.
local function deliver(uid, envelope, ttl, max, a)
  local cut, err = push(a[1] .. uid .. a[2], envelope, ttl, max)
  if err then return nil, err, 0 end
  local woken = 0
  if redis.call('EXISTS', a[3] .. uid .. a[4]) == 1 then
    woken = redis.call('PUBLISH', a[5] .. uid .. a[6], 'W')
  end
  return cut, nil, woken
end
