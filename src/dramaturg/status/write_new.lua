-- The first news of many tasks at once (a bulk send): the same record for each, written
-- only where there is none yet (anything there is newer).
-- KEYS: the record keys' prefix. ARGV: the ttl in ms, the record, the message ids as one
-- argument of netstrings ("<length>:<id>"; one argument each costs more to pack).
local ttl, record, ids = ARGV[1], ARGV[2], ARGV[3]
local pos, count = 1, 0
while pos <= #ids do
  local colon = string.find(ids, ":", pos, true)
  pos = colon + tonumber(string.sub(ids, pos, colon - 1)) + 1
  redis.call('SET', KEYS[1] .. string.sub(ids, colon + 1, pos - 1), record, 'NX', 'PX', ttl)
  count = count + 1
end
return count
