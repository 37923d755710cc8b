-- Drops a claim whose messages were all handled. KEYS: the claim, the
-- user's set of claims.
redis.call('DEL', KEYS[1])
return redis.call('SREM', KEYS[2], KEYS[1])
