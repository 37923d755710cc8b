-- A client says it has every message through one id (an event stream's
-- Last-Event-ID): drops the queue's head through that message. KEYS: the
-- queue, the user's set of claims; ARGV: how many entries at the head to
-- look at (what came back unacknowledged is there, at most an ack window
-- of it), the start of that message's stored form ('{"id":"<id>",'), the
-- heartbeats' key prefix, what the user's claim keys start with. What dead
-- processes held goes back first, as for a take: it was sent before what
-- is queued. Returns how many entries were dropped (0: no such message
-- there, so everything unacknowledged comes again).
recover(KEYS[1], KEYS[2], ARGV[3], ARGV[4])
local head = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local start = ARGV[2]
for i = 1, #head do
  if string.sub(head[i], 1, #start) == start then
    redis.call('LTRIM', KEYS[1], i, -1)
    return i
  end
end
return 0
