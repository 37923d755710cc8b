-- Claims live messages for a user with an ack-mode socket, as a take would
-- have claimed them, without the round trip through the queue. KEYS: a new
-- claim, the user's set of claims; ARGV: envelopes. Run again after a lost
-- reply, it finds its claim made and adds nothing. Returns how many.
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 1, #ARGV, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  redis.call('SADD', KEYS[2], KEYS[1])
end
return #ARGV
