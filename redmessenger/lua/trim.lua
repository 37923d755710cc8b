-- KEYS: claims; ARGV: how many messages each keeps, at its tail. An absolute
-- count, so a trim sent again after a lost reply trims nothing more.
for i = 1, #KEYS do redis.call('LTRIM', KEYS[i], -tonumber(ARGV[i]), -1) end
return #KEYS
