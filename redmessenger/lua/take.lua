-- Takes the head of a queue for a drain. KEYS: the queue, this take's
-- claim, the user's set of claims; ARGV: how many, the heartbeats' key
-- prefix, what the user's claim keys start with. The claim keeps what was
-- taken until the drain has it, so a take repeated after a lost reply finds
-- its claim and returns the same messages again. What dead processes held
-- goes back first. Returns {messages, how many are left}.
local held = redis.call('LRANGE', KEYS[2], 0, -1)
if #held > 0 then return {held, redis.call('LLEN', KEYS[1])} end
recover(KEYS[1], KEYS[3], ARGV[2], ARGV[3])
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items > 0 then
  redis.call('LTRIM', KEYS[1], #items, -1)
  redis.call('RPUSH', KEYS[2], unpack(items))
  redis.call('SADD', KEYS[3], KEYS[2])
end
return {items, redis.call('LLEN', KEYS[1])}
