-- Puts back what dead processes held. KEYS: the queue, the user's set of
-- claims; ARGV: the heartbeats' key prefix, what the user's claim keys
-- start with. Returns how many messages came back.
return recover(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
