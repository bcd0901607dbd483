-- Write task records, each only over an older one (the status store's flush).
-- A record is "<when, 17 characters>|<JSON>", self-contained, so it is replaced whole,
-- and only by newer news: a sender's late flush never overwrites a worker's later change.
-- Optimistic: SET ... GET writes and returns what was there in one command (newer news
-- is the rule); in the rare case that was newer, it is put back.
-- KEYS: the record keys. ARGV: the ttl in ms, then one record per key.
local ttl = ARGV[1]
local call, sub = redis.call, string.sub
for k = 1, #KEYS do
  local record = ARGV[k + 1]
  local old = call('SET', KEYS[k], record, 'PX', ttl, 'GET')
  if old and sub(old, 1, 17) > sub(record, 1, 17) then
    call('SET', KEYS[k], old, 'PX', ttl)
  end
end
return #KEYS
