-- Stores inbox entries for their recipients, wakes those online (who drain
-- them), and acknowledges the entries, atomically. An entry read twice (its
-- reader died before this ran, or this ran and its reply was lost) is
-- stored once: each user keeps the id of the last entry stored for it, and
-- the one reader of the inbox handles entries in their order.
-- KEYS: the inbox. ARGV: its consumer group, ttl, max, what comes before
-- and after a uid in queue keys, presence keys, presence channels, marks
-- (the last entry id stored), and before and after a gid in members keys;
-- then per entry: its id, 'users', 'groups' or '-' (not one: only
-- acknowledged), the user or group id, the envelope. A refusal of every
-- write (OOM) is the reply, to be sent again: what was stored is not again.
-- Returns {stored, failed}: per key Redis refused (not a list), the entry's
-- place, the user id and the error.
local function after(id, mark)
  if not mark then return true end
  local a1, a2 = string.match(id, '^(%d+)-(%d+)$')
  local b1, b2 = string.match(mark, '^(%d+)-(%d+)$')
  if not b1 then return true end
  a1, a2, b1, b2 = tonumber(a1), tonumber(a2), tonumber(b1), tonumber(b2)
  return a1 > b1 or (a1 == b1 and a2 > b2)
end
local ttl, max = tonumber(ARGV[2]), tonumber(ARGV[3])
local affixes = {ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]}
local stored, failed, ids = 0, {}, {}
for i = 14, #ARGV, 4 do
  local id, kind, target, envelope = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  ids[#ids + 1] = id
  local uids = {}
  if kind == 'users' then
    uids[1] = target
  elseif kind == 'groups' then
    local found, err = each_member_once(ARGV[12] .. target .. ARGV[13])
    if err then
      failed[#failed + 1] = (i - 10) / 4
      failed[#failed + 1] = ''
      failed[#failed + 1] = err
    end
    uids = found or {}
  end
  for _, uid in ipairs(uids) do
    local mark = ARGV[10] .. uid .. ARGV[11]
    if after(id, redis.call('GET', mark)) then
      local _, err = deliver(uid, envelope, ttl, max, affixes)
      if err and not string.find(err, 'WRONGTYPE', 1, true) then
        return redis.error_reply(err)
      end
      if err then
        failed[#failed + 1] = (i - 10) / 4
        failed[#failed + 1] = uid
        failed[#failed + 1] = err
      else
        stored = stored + 1
      end
      redis.call('SET', mark, id, 'EX', 604800)
    end
  end
end
if #ids > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(ids)) end
return {stored, failed}
