-- A group's members and the type of its key, for `redmessenger group`:
-- read by the same members() the delivery reads them with, or its error.
-- KEYS: the group's members key.
local uids, err = members(KEYS[1])
if err then return redis.error_reply(err) end
return {redis.call('TYPE', KEYS[1])['ok'], uids}
