-- A group's members. KEYS: the group's members key (a list or a set).
local found, err = members(KEYS[1])
if err then return redis.error_reply(err) end
return found
