-- Puts envelopes back at the head of a queue. KEYS: the queue; ARGV: ttl,
-- then the envelopes in queue order. The first push is the one Redis may
-- refuse (a key of another type, out of memory): then nothing is written,
-- and the refusal is the reply. Returns the queue's length.
if #ARGV < 2 then return redis.call('LLEN', KEYS[1]) end
local first = redis.pcall('LPUSH', KEYS[1], ARGV[#ARGV])
if type(first) == 'table' then return first end
for i = #ARGV - 1, 2, -1 do redis.call('LPUSH', KEYS[1], ARGV[i]) end
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return redis.call('LLEN', KEYS[1])
